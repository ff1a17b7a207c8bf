"""Grain streams of model batches: the training stream (with CutMix) and its resumable state.

Streams ship compact host arrays; `device_inputs` builds the original's model input on the
device. Batch format and sampling: docs/data.md#windows-and-batches. Windows are read by
`window_reader.py`; validation and prediction live in `eval_windows.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from dwise_jax.data import folds, windows
from dwise_jax.data.sensorium import DatasetError, Mouse, SensoriumDataset
from dwise_jax.data.window_reader import (
    TrialArrays,
    load_window,
    neuron_mask,
    pad_neurons,
    read_options,
)

# Random stream purposes: distinct tags keep (seed, epoch) and (seed, epoch, position) apart.
_ORDER, _SAMPLE = 1, 2
# An endless stream still needs a finite Grain length; 2**40 batches never run out.
_ENDLESS_BATCHES = 2**40
_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TrainStreamConfig:
    """What the training stream draws and how it loads.

    Attributes:
        fold: validation fold (0..6), whose trials are left out; None trains on all folds.
        batch_size: global batch size, all hosts together (the original: 32).
        epoch_size: samples per epoch; each mouse gets epoch_size // num_mice (72000 -> 7200).
        num_epochs: epochs in the stream; None for an endless stream.
        seed: every random draw derives from it.
        cutmix_alpha, cutmix_prob: lambda ~ Beta(alpha, alpha), applied with probability p.
        num_workers: Grain worker processes (0: load in this process with threads).
        worker_buffer_size: batches each worker prepares ahead.
        read_threads, read_buffer: threads and batches prefetched per process.
        shard_index, shard_count: this host's share of every global batch (multi-host).
    """

    fold: int | None
    batch_size: int = 32
    epoch_size: int = 72000
    num_epochs: int | None = None
    seed: int = 0
    cutmix_alpha: float = 1.0
    cutmix_prob: float = 0.5
    num_workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    read_buffer: int = 2
    shard_index: int = 0
    shard_count: int = 1

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.shard_count


@dataclasses.dataclass(frozen=True)
class SampleDraw:
    """The random choices of one training sample (what the batch is built from)."""

    mouse: int
    trial: int
    anchor: int
    box: np.ndarray  # (4,) int64, all zeros when not CutMixed
    partner_trial: int
    partner_anchor: int


# --------------------------------------------------------------------------- training samples


def training_trials(mouse: Mouse, fold: int | None) -> np.ndarray:
    """Trial ids of a mouse's training folds (fold != `fold`, with a fold), long enough."""
    trial_fold = folds.trial_folds(mouse)
    keep = (trial_fold >= 0) & (trial_fold != (-1 if fold is None else fold))
    keep &= np.array([mouse.is_labeled(t) for t in range(mouse.num_trials)], bool)
    keep &= mouse.lengths > windows.BEHIND  # at least one full window
    return np.flatnonzero(keep)


def build_sample(mouse: Mouse, draw: SampleDraw, num_neurons: int,
                 arrays: TrialArrays | None = None) -> dict[str, np.ndarray]:
    """One sample of the training batch format from its draw (targets padded to num_neurons)."""
    frames, traces, y1 = load_window(mouse, draw.trial, draw.anchor, arrays=arrays)
    a = windows.box_fraction(draw.box)
    if a > 0:
        partner_frames, partner_traces, y2 = load_window(mouse, draw.partner_trial,
                                                         draw.partner_anchor, arrays=arrays)
        # The same float32 arithmetic as windows.apply_cutmix.
        targets = (1.0 - a) * y1 + a * y2
    else:  # an empty box pastes nothing: the partner is never read
        partner_frames, partner_traces, targets = np.zeros_like(frames), np.zeros_like(
            traces), y1
    return {
        "frames": frames, "traces": traces,
        "partner_frames": partner_frames, "partner_traces": partner_traces,
        "box": np.asarray(draw.box, np.int32), "mouse": np.int32(mouse.index),
        "targets": pad_neurons(targets, num_neurons),
        "neuron_mask": neuron_mask(mouse.num_neurons, num_neurons),
    }


class TrainSamples:
    """The training stream's samples: a pure function of (seed, epoch, position).

    Picklable (Grain's workers receive it); holds only small per-mouse tables.
    """

    def __init__(self, mice: list[Mouse], config: TrainStreamConfig):
        self.mice = mice
        self.config = config
        self.trials = [training_trials(m, config.fold) for m in mice]
        for mouse, trials in zip(mice, self.trials, strict=True):
            if trials.size == 0:
                raise DatasetError(f"{mouse.path}: has no training trial outside fold "
                                 f"{config.fold}")
        self.per_mouse = config.epoch_size // len(mice)
        self.epoch_length = self.per_mouse * len(mice)
        self.steps_per_epoch = self.epoch_length // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"epoch of {self.epoch_length} samples is shorter than one batch "
                             f"of {config.batch_size}")
        self.num_neurons = max(m.num_neurons for m in mice)
        self._order: tuple[int, np.ndarray] | None = None
        self.arrays = TrialArrays()

    def order(self, epoch: int) -> np.ndarray:
        """(epoch_length,) mouse index per position: each mouse per_mouse times, shuffled."""
        cached = self._order
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.config.seed, _ORDER, epoch])
            order = rng.permutation(np.repeat(np.arange(len(self.mice)), self.per_mouse))
            cached = self._order = (epoch, order)
        return cached[1]

    def draw(self, epoch: int, position: int) -> SampleDraw:
        """Draw order: trial, anchor, CutMix (apply, lambda, row, column), partner trial, anchor."""
        cfg = self.config
        m = int(self.order(epoch)[position])
        trials, lengths = self.trials[m], self.mice[m].lengths
        rng = np.random.default_rng([cfg.seed, _SAMPLE, epoch, position])
        trial = int(trials[rng.integers(trials.size)])
        anchor = int(rng.integers(windows.BEHIND, lengths[trial]))
        box = windows.draw_cutmix(rng, cfg.cutmix_alpha, cfg.cutmix_prob)
        if windows.box_fraction(box) == 0:  # applied with cut <= 1: nothing is pasted
            box = np.zeros(4, np.int64)
        partner_trial = int(trials[rng.integers(trials.size)])
        partner_anchor = int(rng.integers(windows.BEHIND, lengths[partner_trial]))
        return SampleDraw(m, trial, anchor, box, partner_trial, partner_anchor)

    def locate(self, batch: int, row: int) -> tuple[int, int]:
        """(epoch, position in the epoch) of row `row` of this host's batch `batch`."""
        cfg = self.config
        epoch, step = divmod(batch, self.steps_per_epoch)
        return epoch, step * cfg.batch_size + cfg.shard_index * cfg.local_batch_size + row

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        """Grain map function: sample `index` of this host's flat sample sequence."""
        batch, row = divmod(int(index), self.config.local_batch_size)
        draw = self.draw(*self.locate(batch, row))
        return build_sample(self.mice[draw.mouse], draw, self.num_neurons, self.arrays)


# --------------------------------------------------------------------------- the stream


def _as_dataset(dataset: SensoriumDataset | str | os.PathLike) -> SensoriumDataset:
    return dataset if isinstance(dataset, SensoriumDataset) else SensoriumDataset.open(dataset)


class TrainStream:
    """Training batches (docs/data.md#windows-and-batches) with a resumable state.

    `get_state()` (a JSON-serialisable dict: batches consumed and what fixes their content, not
    workers, threads or shards) is saved with the model; `set_state` on a fresh stream continues
    exactly there. Close it (or use it as a context manager) to stop the worker processes.
    """

    def __init__(self, dataset: SensoriumDataset | str | os.PathLike, config: TrainStreamConfig):
        if config.batch_size % config.shard_count:
            raise ValueError(f"batch size {config.batch_size} is not divisible by "
                             f"{config.shard_count} shards")
        if not 0 <= config.shard_index < config.shard_count:
            raise ValueError(f"shard index {config.shard_index} not in 0..{config.shard_count - 1}")
        self.dataset = _as_dataset(dataset)
        self.config = config
        self.samples = TrainSamples(self.dataset.mice, config)
        self.steps_per_epoch = self.samples.steps_per_epoch
        self.num_batches = (_ENDLESS_BATCHES if config.num_epochs is None
                            else config.num_epochs * self.steps_per_epoch)
        self.num_neurons = self.samples.num_neurons
        local = config.local_batch_size
        self._batches = (grain.MapDataset.range(self.num_batches * local)
                         .map(self.samples)
                         .batch(local, drop_remainder=True))
        self._next = 0
        self._iterator: Any = None

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._next // self.steps_per_epoch

    def _start(self) -> Any:
        cfg = self.config
        ds = self._batches[self._next:].to_iter_dataset(
            read_options(cfg.read_threads, cfg.read_buffer))
        if cfg.num_workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
        return iter(ds)

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start()
        try:
            batch = next(self._iterator)
        except BaseException:
            # The end, or a worker's error (e.g. DatasetError naming a file) re-raised here by
            # Grain: stop the pool so that nothing waits on it, then let the error through.
            self.close()
            raise
        self._next += 1
        return batch

    def _fingerprint(self) -> dict[str, Any]:
        cfg = self.config
        return {"fold": cfg.fold, "batch_size": cfg.batch_size, "epoch_size": cfg.epoch_size,
                "seed": cfg.seed, "cutmix_alpha": cfg.cutmix_alpha,
                "cutmix_prob": cfg.cutmix_prob,
                "mice": [[m.name, m.num_neurons] for m in self.dataset.mice]}

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state: batches consumed and what fixes the batches' content."""
        return {"version": _STATE_VERSION, "next_batch": self._next, **self._fingerprint()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues after the batches that `state` had consumed (restarts the workers)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not "
                             f"{_STATE_VERSION}")
        mine = self._fingerprint()
        theirs = {k: state.get(k) for k in mine}
        theirs["mice"] = [list(x) for x in theirs["mice"] or []]
        differ = sorted(k for k in mine if mine[k] != theirs[k])
        if differ:
            raise ValueError("loader state was saved with other settings: " + ", ".join(
                f"{k} {theirs[k]!r} (now {mine[k]!r})" for k in differ))
        self.close()
        self._next = int(state["next_batch"])

    def close(self) -> None:
        """Stops the worker processes (idempotent); the next batch restarts them."""
        if self._iterator is not None:
            iterator, self._iterator = self._iterator, None
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> TrainStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_state(state: Mapping[str, Any]) -> np.ndarray:
    """The state as a uint8 array of its JSON text: an array leaf any Orbax item can hold."""
    return np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8).copy()


def decode_state(encoded: np.ndarray | str | bytes) -> dict[str, Any]:
    """Inverse of `encode_state` (also takes the JSON text itself)."""
    if isinstance(encoded, np.ndarray):
        encoded = np.asarray(encoded, np.uint8).tobytes()
    return json.loads(encoded)


# --------------------------------------------------------------------------- on the device


def device_inputs(batch: Mapping[str, jax.Array | np.ndarray]) -> jax.Array:
    """The model input of a batch of any stream: (B, 16, 64, 64, 5) float32, jit-able.

    expand_inputs of the compact arrays and, for training batches (those with a `box`), the
    partner's box pasted into all channels and frames: exactly the original's CutMixed input.
    """
    x = windows.expand_inputs(batch["frames"], batch["traces"])
    if "box" not in batch:
        return x
    partner = windows.expand_inputs(batch["partner_frames"], batch["partner_traces"])
    # apply_cutmix also mixes targets; the targets here arrive mixed, so it gets dummies that
    # jit removes.
    dummy = jnp.zeros((*batch["box"].shape[:-1], 1, 1), jnp.float32)
    x, _ = windows.apply_cutmix(x, dummy, partner, dummy, batch["box"])
    return x
