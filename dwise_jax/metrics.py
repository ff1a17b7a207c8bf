"""Evaluation metrics as pure NumPy functions: correlations, FEVE, the Poisson loss
(docs/original.md#metrics). Trial arrays are ``(neurons, time)``, cut by the caller to the
trial's valid length; training's val_corr adds windows' (frames, neurons) rows to ``PearsonSums``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

EPS = 1e-8  # added to each std in Pearson r (original and starter kit)
POISSON_EPS = 1e-12  # inside the log of the starter kit's get_poisson_loss
SKIP_FRAMES = 50  # the competition drops each trial's first 50 frames
SCORED_FRAMES = 300  # the winner's submission keeps at most the first 300 frames

Trials = np.ndarray | Sequence[np.ndarray]
Cut = Literal["baseline", "submission"]


def _float(x: np.ndarray) -> np.ndarray:
    # Sums run in the inputs' float dtype (at least float32), like the original.
    x = np.asarray(x)
    return x.astype(np.result_type(x.dtype, np.float32), copy=False)


def pearson_per_neuron(pred: np.ndarray, target: np.ndarray, axis: int, *,
                       nan_to_zero: bool = False) -> np.ndarray:
    """Pearson r along ``axis`` (the samples) per remaining index, population std + EPS;
    a constant series gives 0, a NaN gives NaN unless ``nan_to_zero`` (the starter kit)."""
    pred, target = _float(pred), _float(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ")
    x = (pred - pred.mean(axis, keepdims=True)) / (pred.std(axis, keepdims=True) + EPS)
    y = (target - target.mean(axis, keepdims=True)) / (target.std(axis, keepdims=True) + EPS)
    r = (x * y).mean(axis)
    return np.nan_to_num(r, nan=0.0) if nan_to_zero else r


def submission_frames(length: int) -> slice:
    """The winner's scored frames of a trial: [:300], [50:], then the last dropped (249)."""
    return slice(SKIP_FRAMES, max(min(length, SCORED_FRAMES) - 1, SKIP_FRAMES))


def cut_frames(x: np.ndarray, length: int | None = None) -> np.ndarray:
    """The submission cut of ``x`` (..., time) of ``length`` valid frames (None: all)."""
    n = x.shape[-1] if length is None else min(int(length), x.shape[-1])
    return x[..., submission_frames(n)]


def _concat_trials(preds: Trials, targets: Trials, cut: Cut,
                   skip: int) -> tuple[np.ndarray, np.ndarray]:
    """Cuts each trial, then concatenates along time: two (neurons, frames) arrays."""
    if cut not in ("baseline", "submission"):
        raise ValueError(f"unknown cut {cut!r}")
    if cut == "submission" and skip != SKIP_FRAMES:
        raise ValueError("the submission cut always skips 50 frames")
    if isinstance(preds, np.ndarray):
        preds, targets = [preds], [targets]
    if len(preds) != len(targets) or not preds:
        raise ValueError(f"{len(preds)} predicted and {len(targets)} target trials")
    for p, t in zip(preds, targets, strict=True):
        if p.shape != t.shape:
            raise ValueError(f"prediction {p.shape} and target {t.shape} of a trial differ")
    # baseline (starter kit): frames [skip:], no 300 cap, no last-frame drop
    return tuple(np.concatenate([_float(a)[..., skip:] if cut == "baseline"
                                 else cut_frames(_float(a)) for a in x], axis=-1)
                 for x in (preds, targets))


@dataclasses.dataclass(frozen=True)
class CorrelationScores:
    """Per-neuron r per mouse, ``per_mouse`` {mouse: (neurons,)}, with the two averages."""

    per_mouse: dict[str, np.ndarray]

    @property
    def per_neuron(self) -> np.ndarray:
        return np.concatenate(list(self.per_mouse.values()))

    @property
    def mouse_means(self) -> dict[str, float]:
        return {m: float(np.mean(r)) for m, r in self.per_mouse.items()}

    @property
    def neuron_mean(self) -> float:  # the official score
        return float(np.mean(self.per_neuron))

    @property
    def mouse_mean(self) -> float:  # the winner's out-of-fold score
        return float(np.mean(list(self.mouse_means.values())))


class StreamingCorrelation:
    """Per-neuron r of each mouse's trials, added one at a time and cut ("baseline": frames
    [skip:], the starter kit; "submission": the winner's out-of-fold evaluation, which keeps
    NaN), from float64 ``PearsonSums`` per mouse (a real mouse's trials hold gigabytes)."""

    def __init__(self, *, cut: Cut = "baseline", skip: int = SKIP_FRAMES,
                 nan_to_zero: bool = True):
        self.cut, self.skip, self.nan_to_zero = cut, skip, nan_to_zero
        self.sums: dict[str, PearsonSums] = {}
        self.trials: dict[str, int] = {}

    def add(self, mouse: str, pred: np.ndarray, target: np.ndarray) -> None:
        """Adds one trial of ``mouse``: pred and target (neurons, L), cut to the valid L."""
        pred, target = _concat_trials(pred, target, self.cut, self.skip)
        sums = self.sums.get(mouse, PearsonSums.zeros(pred.shape[0]))
        self.sums[mouse] = sums + PearsonSums.of(pred.T, target.T)
        self.trials[mouse] = self.trials.get(mouse, 0) + 1

    def scores(self) -> CorrelationScores:
        """Per-neuron r per mouse, mice in the order they were first added."""
        rs = {mouse: sums.correlation() for mouse, sums in self.sums.items()}
        if self.nan_to_zero:
            rs = {mouse: np.nan_to_num(r, nan=0.0) for mouse, r in rs.items()}
        return CorrelationScores(rs)


def poisson_loss(output: Trials, target: Trials, *, skip: int = SKIP_FRAMES,
                 avg: bool = False) -> np.ndarray:
    """The starter kit's Poisson loss, output - target * log(output + 1e-12), over frames
    [skip:] of one trial (neurons, L) or several: (neurons,), the sum (the mean with ``avg``)."""
    out, tgt = _concat_trials(output, target, "baseline", skip)
    loss = out - tgt * np.log(out + POISSON_EPS)
    return loss.mean(-1) if avg else loss.sum(-1)


@dataclasses.dataclass(frozen=True)
class PearsonSums:
    """Float64 running sums for Pearson r over (rows, neurons) batches: start from
    ``zeros(neurons)``, add ``PearsonSums.of(pred, target)`` per batch, then ``correlation()``
    (as ``pearson_per_neuron(rows, axis=0)`` of all rows stacked)."""

    n: int
    x: np.ndarray
    y: np.ndarray
    xx: np.ndarray
    yy: np.ndarray
    xy: np.ndarray

    @classmethod
    def zeros(cls, neurons: int) -> PearsonSums:
        z = np.zeros(neurons)
        return cls(0, z, z, z, z, z)

    @classmethod
    def of(cls, pred: np.ndarray, target: np.ndarray) -> PearsonSums:
        x, y = np.asarray(pred, np.float64), np.asarray(target, np.float64)
        return cls(len(x), x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0))

    def __add__(self, other: PearsonSums) -> PearsonSums:
        return PearsonSums(*(getattr(self, f.name) + getattr(other, f.name)
                             for f in dataclasses.fields(self)))

    def correlation(self) -> np.ndarray:
        """(neurons,) r = cov / ((std_x + EPS) (std_y + EPS)), population moments."""
        mx, my = self.x / self.n, self.y / self.n
        sx = np.sqrt(np.maximum(self.xx / self.n - mx * mx, 0.0))
        sy = np.sqrt(np.maximum(self.yy / self.n - my * my, 0.0))
        return (self.xy / self.n - mx * my) / ((sx + EPS) * (sy + EPS))


def _repeat_arrays(preds: Sequence[np.ndarray],
                   responses: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pred broadcast to (repeats, neurons, time), responses) per video."""
    if len(preds) != len(responses) or not preds:
        raise ValueError(f"{len(preds)} predicted and {len(responses)} repeated videos")
    pairs = []
    for p, r in zip(preds, responses, strict=True):
        r = _float(r)
        if r.ndim != 3:
            raise ValueError(f"responses must be (repeats, neurons, time), got {r.shape}")
        pairs.append((np.broadcast_to(_float(p), r.shape), r))
    return pairs


def correlation_to_average(preds: Sequence[np.ndarray], responses: Sequence[np.ndarray], *,
                           nan_to_zero: bool = True) -> np.ndarray:
    """(neurons,) r between prediction and response, both averaged over repeats, videos
    concatenated along time. ``preds``: per video (repeats, neurons, time) or (neurons, time);
    ``responses``: per video (repeats, neurons, time)."""
    pairs = _repeat_arrays(preds, responses)
    pred = np.concatenate([p.mean(0) for p, _ in pairs], axis=-1)
    mean = np.concatenate([r.mean(0) for _, r in pairs], axis=-1)
    return pearson_per_neuron(pred, mean, -1, nan_to_zero=nan_to_zero)


FEV_THRESHOLD = 0.15  # the least fraction of explainable variance FEVE scores (docs/prediction.md)


def feve(preds: Sequence[np.ndarray], responses: Sequence[np.ndarray], *,
         fev_threshold: float = FEV_THRESHOLD) -> np.ndarray:
    """(neurons,) fraction of explainable variance explained (neuralpredictors' form, each
    (video, frame) one stimulus; shapes as ``correlation_to_average``, 2+ repeats); NaN where
    total - noise variance is not positive or under `fev_threshold` of the total."""
    pairs = _repeat_arrays(preds, responses)
    if min(r.shape[0] for _, r in pairs) < 2:
        raise ValueError("FEVE needs at least 2 repeats of every video")
    # Noise: the mean over (video, frame) of the variance across repeats; total: the variance
    # of all responses, each (video, frame, repeat) one sample; both ddof 1.
    noise = np.concatenate([r.var(0, ddof=1) for _, r in pairs], axis=-1).mean(-1)
    samples = lambda a: np.moveaxis(a, 0, -1).reshape(a.shape[1], -1)  # (neurons, samples)
    total = np.concatenate([samples(r) for _, r in pairs], axis=-1).var(-1, ddof=1)
    mse = np.concatenate([samples((r - p) ** 2) for p, r in pairs], axis=-1).mean(-1)
    explainable = total - noise
    kept = (explainable > 0) & (explainable >= fev_threshold * total)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(kept, 1.0 - (mse - noise) / explainable, np.nan)
