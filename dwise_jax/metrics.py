"""Evaluation metrics as pure NumPy functions: correlations, FEVE, the Poisson loss.

Trial arrays are ``(neurons, time)``, time last as on disk, cut by the caller to the trial's
valid length; ``validation_correlation`` takes channels-last windows ``(batch, time, neurons)``.
Pearson r is the original's and the starter kit's (docs/original.md#metrics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
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


def pearson_per_neuron(
    pred: np.ndarray,
    target: np.ndarray,
    axis: int,
    *,
    nan_to_zero: bool = False,
    eps: float = EPS,
) -> np.ndarray:
    """Pearson r along ``axis`` (the samples), one value per remaining index (neuron).

    ``pred`` and ``target`` have one shape, e.g. (neurons, time) with axis=-1 or (samples,
    neurons) with axis=0. (x - mean) / (population std + eps) for both, mean of the product; a
    constant series gives 0, a NaN gives NaN unless ``nan_to_zero`` (the starter kit's scores).
    """
    pred, target = _float(pred), _float(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ")
    x = (pred - pred.mean(axis, keepdims=True)) / (pred.std(axis, keepdims=True) + eps)
    y = (target - target.mean(axis, keepdims=True)) / (target.std(axis, keepdims=True) + eps)
    r = (x * y).mean(axis)
    return np.nan_to_num(r, nan=0.0) if nan_to_zero else r


# --------------------------------------------------------------------------- frame cuts


def submission_frames(length: int) -> slice:
    """The frames of a trial of ``length`` frames that the winner submits and scores.

    The original takes [:300], then [50:], then drops the last frame: [50 : min(L, 300) - 1],
    249 frames for L >= 300 (the organisers' README says 250; the winner dropped one more).
    """
    return slice(SKIP_FRAMES, max(min(length, SCORED_FRAMES) - 1, SKIP_FRAMES))


def cut_frames(x: np.ndarray, length: int | None = None) -> np.ndarray:
    """The submission cut of ``x`` (..., time), NaN-padded past ``length`` (None: all)."""
    n = x.shape[-1] if length is None else min(int(length), x.shape[-1])
    return x[..., submission_frames(n)]


def _cut(x: np.ndarray, cut: Cut, skip: int) -> np.ndarray:
    if cut == "baseline":  # starter kit: responses[..., skip:], no 300 cap, no last-frame drop
        return x[..., skip:]
    if cut == "submission":
        if skip != SKIP_FRAMES:
            raise ValueError("the submission cut always skips 50 frames")
        return cut_frames(x)
    raise ValueError(f"unknown cut {cut!r}")


def _concat_trials(
    preds: Trials, targets: Trials, cut: Cut, skip: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut each trial, then concatenate along time: two (neurons, sum of frames) arrays."""
    if isinstance(preds, np.ndarray):
        preds, targets = [preds], [targets]
    if len(preds) != len(targets) or not preds:
        raise ValueError(f"{len(preds)} predicted and {len(targets)} target trials")
    for p, t in zip(preds, targets, strict=True):
        if p.shape != t.shape:
            raise ValueError(f"prediction {p.shape} and target {t.shape} of a trial differ")
    pred = np.concatenate([_cut(_float(p), cut, skip) for p in preds], axis=-1)
    target = np.concatenate([_cut(_float(t), cut, skip) for t in targets], axis=-1)
    return pred, target


# --------------------------------------------------------------------------- single trials


@dataclasses.dataclass(frozen=True)
class CorrelationScores:
    """Per-neuron correlations per mouse, with the competition's two averages.

    Attributes:
        per_mouse: {mouse: (neurons,) r}, in mouse order.
    """

    per_mouse: dict[str, np.ndarray]

    @property
    def per_neuron(self) -> np.ndarray:
        """(all neurons,) the mice's values concatenated in mouse order."""
        return np.concatenate(list(self.per_mouse.values()))

    @property
    def mouse_means(self) -> dict[str, float]:
        """{mouse: mean over its neurons}."""
        return {m: float(np.mean(r)) for m, r in self.per_mouse.items()}

    @property
    def neuron_mean(self) -> float:
        """Mean over all neurons of all mice (neuron-weighted: the official score)."""
        return float(np.mean(self.per_neuron))

    @property
    def mouse_mean(self) -> float:
        """Mean over mice of the per-mouse means (mouse-weighted: the winner's OOF score)."""
        return float(np.mean(list(self.mouse_means.values())))


def competition_correlation(
    preds: Mapping[str, Sequence[np.ndarray]],
    targets: Mapping[str, Sequence[np.ndarray]],
    *,
    cut: Cut = "baseline",
    skip: int = SKIP_FRAMES,
    nan_to_zero: bool = True,
) -> CorrelationScores:
    """The single-trial correlation: cut each trial, concatenate a mouse's trials, r per neuron.

    Args:
        preds, targets: {mouse: [(neurons, L_i) per trial]}, same mice and order, valid frames.
        cut: "baseline" keeps frames [skip:] of each trial (starter kit's ``get_correlations``);
            "submission" keeps [50 : min(L, 300) - 1] (the winner's out-of-fold evaluation).
        nan_to_zero: NaN r becomes 0 (starter kit). The winner's evaluation keeps NaN.
    """
    if list(preds) != list(targets):
        raise ValueError("preds and targets must hold the same mice in the same order")
    per_mouse = {}
    for mouse in preds:
        pred, target = _concat_trials(preds[mouse], targets[mouse], cut, skip)
        per_mouse[mouse] = pearson_per_neuron(pred, target, -1, nan_to_zero=nan_to_zero)
    return CorrelationScores(per_mouse)


class StreamingCorrelation:
    """``competition_correlation`` of trials that arrive one at a time, in bounded memory.

    Per mouse, float64 running sums of the cut frames (``PearsonSums``) instead of the
    concatenated arrays: a real mouse's out-of-fold trials hold gigabytes. Gives the same r
    as ``competition_correlation`` on the concatenation, up to float rounding.
    """

    def __init__(self, *, cut: Cut = "baseline", skip: int = SKIP_FRAMES,
                 nan_to_zero: bool = True):
        self.cut, self.skip, self.nan_to_zero = cut, skip, nan_to_zero
        self.sums: dict[str, PearsonSums] = {}
        self.trials: dict[str, int] = {}

    def add(self, mouse: str, pred: np.ndarray, target: np.ndarray) -> None:
        """Adds one trial of ``mouse``: pred and target (neurons, L), cut to the valid L."""
        pred, target = _concat_trials([pred], [target], self.cut, self.skip)
        sums = self.sums.get(mouse, PearsonSums.zeros(pred.shape[0]))
        self.sums[mouse] = sums + PearsonSums.of(pred.T, target.T)
        self.trials[mouse] = self.trials.get(mouse, 0) + 1

    def scores(self) -> CorrelationScores:
        """Per-neuron r per mouse, mice in the order they were first added."""
        per_mouse = {}
        for mouse, sums in self.sums.items():
            r = sums.correlation()
            per_mouse[mouse] = np.nan_to_num(r, nan=0.0) if self.nan_to_zero else r
        return CorrelationScores(per_mouse)


def poisson_loss(
    output: Trials,
    target: Trials,
    *,
    skip: int = SKIP_FRAMES,
    avg: bool = False,
    eps: float = POISSON_EPS,
) -> np.ndarray:
    """The starter kit's evaluation Poisson loss, output - target * log(output + 1e-12).

    ``output`` and ``target``: one trial (neurons, L) or a sequence of them; frames [skip:] of
    each are concatenated. Returns (neurons,), the sum over frames (the mean with ``avg``).
    """
    out, tgt = _concat_trials(output, target, "baseline", skip)
    loss = out - tgt * np.log(out + eps)
    return loss.mean(-1) if avg else loss.sum(-1)


# --------------------------------------------------------------------------- validation


def validation_correlation(
    preds: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    mice_weights: np.ndarray,
) -> tuple[np.ndarray, float]:
    """The original's ``val_corr``: per readout r over (sample, frame) rows, then means.

    For readout i, the rows of the samples with mice_weights[:, i] != 0 are flattened over
    (sample, frame), r is taken per neuron and averaged; ``val_corr`` is the mean over readouts.
    No NaN handling, like the original. For many batches, see ``PearsonSums``.

    Args:
        preds, targets: per readout i, (samples, time, neurons_i) (targets ReLU'd).
        mice_weights: (samples, readouts); one-hot in the original.

    Returns:
        ((readouts,) mean r, NaN for a readout without samples; the mean over the others).
    """
    weights = np.asarray(mice_weights)
    per_readout = np.full(len(preds), np.nan)
    for i, (pred, target) in enumerate(zip(preds, targets, strict=True)):
        keep = weights[:, i] != 0
        if keep.any():
            n = pred.shape[-1]
            r = pearson_per_neuron(pred[keep].reshape(-1, n), target[keep].reshape(-1, n), 0)
            per_readout[i] = float(np.mean(r))
    return per_readout, float(np.nanmean(per_readout))


@dataclasses.dataclass(frozen=True)
class PearsonSums:
    """Float64 running sums for Pearson r over rows that arrive in batches.

    Gives the same r as ``pearson_per_neuron(rows, axis=0)`` on all rows stacked, without
    keeping them: ``sums = sums + PearsonSums.of(pred_rows, target_rows)`` per batch, then
    ``sums.correlation()``. Start from ``PearsonSums.zeros(neurons)``.
    """

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
        """Sums of (rows, neurons) arrays, e.g. a readout's kept windows reshaped."""
        x, y = np.asarray(pred, np.float64), np.asarray(target, np.float64)
        return cls(len(x), x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0))

    def __add__(self, other: PearsonSums) -> PearsonSums:
        return PearsonSums(
            self.n + other.n,
            *(getattr(self, f) + getattr(other, f) for f in ("x", "y", "xx", "yy", "xy")),
        )

    def correlation(self, eps: float = EPS) -> np.ndarray:
        """(neurons,) r = cov / ((std_x + eps) (std_y + eps)), population moments."""
        mx, my = self.x / self.n, self.y / self.n
        sx = np.sqrt(np.maximum(self.xx / self.n - mx * mx, 0.0))
        sy = np.sqrt(np.maximum(self.yy / self.n - my * my, 0.0))
        return (self.xy / self.n - mx * my) / ((sx + eps) * (sy + eps))


# --------------------------------------------------------------------------- repeats


def _repeat_arrays(
    preds: Sequence[np.ndarray], responses: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs (pred broadcast to (repeats, neurons, time), responses) per video."""
    if len(preds) != len(responses) or not preds:
        raise ValueError(f"{len(preds)} predicted and {len(responses)} repeated videos")
    pairs = []
    for p, r in zip(preds, responses, strict=True):
        r = _float(r)
        if r.ndim != 3:
            raise ValueError(f"responses must be (repeats, neurons, time), got {r.shape}")
        pairs.append((np.broadcast_to(_float(p), r.shape), r))
    return pairs


def correlation_to_average(
    preds: Sequence[np.ndarray],
    responses: Sequence[np.ndarray],
    *,
    nan_to_zero: bool = True,
) -> np.ndarray:
    """r between the prediction and the mean over repeats of the responses to each video.

    Both are averaged over repeats (a prediction differs per repeat through behaviour), the
    videos concatenated along time, r taken per neuron: (neurons,). Frames are used as given.
    ``preds``: per video (repeats, neurons, time) or (neurons, time); ``responses``: per video
    (repeats, neurons, time).
    """
    pairs = _repeat_arrays(preds, responses)
    pred = np.concatenate([p.mean(0) for p, _ in pairs], axis=-1)
    mean = np.concatenate([r.mean(0) for _, r in pairs], axis=-1)
    return pearson_per_neuron(pred, mean, -1, nan_to_zero=nan_to_zero)


def feve(preds: Sequence[np.ndarray], responses: Sequence[np.ndarray]) -> np.ndarray:
    """Fraction of explainable variance explained, in neuralpredictors' form.

    FEVE = 1 - (MSE - noise var) / (total var - noise var), where each (video, frame) is one
    stimulus: noise var is the mean over stimuli of the across-repeat variance (ddof 1),
    total var the variance (ddof 1) of all (repeat, video, frame) samples stacked, and MSE
    the mean over those samples of (response - prediction)^2. Shapes as
    ``correlation_to_average``, at least 2 repeats; returns (neurons,).
    """
    pairs = _repeat_arrays(preds, responses)
    if min(r.shape[0] for _, r in pairs) < 2:
        raise ValueError("FEVE needs at least 2 repeats of every video")
    noise_var = np.concatenate([r.var(0, ddof=1) for _, r in pairs], axis=-1).mean(-1)
    stacked = np.concatenate([np.moveaxis(r, 0, -1).reshape(r.shape[1], -1) for _, r in pairs], -1)
    total_var = stacked.var(-1, ddof=1)
    sq_err = [np.moveaxis((r - p) ** 2, 0, -1).reshape(r.shape[1], -1) for p, r in pairs]
    mse = np.concatenate(sq_err, axis=-1).mean(-1)
    return 1.0 - (mse - noise_var) / (total_var - noise_var)
