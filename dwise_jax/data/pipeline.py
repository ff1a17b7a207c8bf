"""The training stream of model batches (with CutMix) and its resumable state.

Streams ship compact host arrays; `device_inputs` builds the model input on the device. Batch
format and sampling: docs/data.md#windows-and-batches; validation and prediction: `eval_windows`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
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
class SampleDraw:
    """The random choices of one training sample (what the batch is built from)."""

    mouse: int
    trial: int
    anchor: int
    box: np.ndarray  # (4,) int64, all zeros when not CutMixed
    partner_trial: int
    partner_anchor: int


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
    frames, traces, targets = load_window(mouse, draw.trial, draw.anchor, arrays=arrays)
    partner_traces = np.zeros_like(traces)
    if windows.box_fraction(draw.box) > 0:  # an empty box pastes nothing: no partner is read
        partner_frames, partner_traces, partner_targets = load_window(
            mouse, draw.partner_trial, draw.partner_anchor, arrays=arrays)
        frames, targets = windows.cutmix(frames, targets, partner_frames, partner_targets,
                                         draw.box)
    return {
        "frames": frames, "traces": traces, "partner_traces": partner_traces,
        "box": np.asarray(draw.box, np.int32), "mouse": np.int32(mouse.index),
        "targets": pad_neurons(targets, num_neurons),
        "neuron_mask": neuron_mask(mouse.num_neurons, num_neurons),
    }


class TrainSamples:
    """The training stream's samples: a pure function of (seed, epoch, position). Picklable
    (Grain's workers receive it): small per-mouse tables and the settings that fix the samples."""

    def __init__(self, mice: list[Mouse], config: Any, fold: int | None, shard_index: int = 0,
                 shard_count: int = 1):
        d = config.data
        self.mice = mice
        self.fold, self.seed = fold, config.seed
        self.batch_size, self.epoch_size = d.batch_size, d.train_epoch_size
        self.cutmix_alpha, self.cutmix_prob = d.cutmix_alpha, d.cutmix_prob
        self.local_batch_size = d.batch_size // shard_count
        self.shard_index = shard_index
        self.trials = [training_trials(m, fold) for m in mice]
        for mouse, trials in zip(mice, self.trials, strict=True):
            if trials.size == 0:
                raise DatasetError(f"{mouse.path}: has no training trial outside fold {fold}")
        self.per_mouse = self.epoch_size // len(mice)
        self.epoch_length = self.per_mouse * len(mice)
        self.steps_per_epoch = self.epoch_length // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"epoch of {self.epoch_length} samples is shorter than one batch "
                             f"of {self.batch_size}")
        self.num_neurons = max(m.num_neurons for m in mice)
        self._order: tuple[int, np.ndarray] | None = None
        self.arrays = TrialArrays()

    def order(self, epoch: int) -> np.ndarray:
        """(epoch_length,) mouse index per position: each mouse per_mouse times, shuffled."""
        cached = self._order
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, _ORDER, epoch])
            order = rng.permutation(np.repeat(np.arange(len(self.mice)), self.per_mouse))
            cached = self._order = (epoch, order)
        return cached[1]

    def draw(self, epoch: int, position: int) -> SampleDraw:
        """Draw order: trial, anchor, CutMix (apply, lambda, row, column), partner trial, anchor."""
        m = int(self.order(epoch)[position])
        trials, lengths = self.trials[m], self.mice[m].lengths
        rng = np.random.default_rng([self.seed, _SAMPLE, epoch, position])
        trial = int(trials[rng.integers(trials.size)])
        anchor = int(rng.integers(windows.BEHIND, lengths[trial]))
        box = windows.draw_cutmix(rng, self.cutmix_alpha, self.cutmix_prob)
        if windows.box_fraction(box) == 0:  # applied with cut <= 1: nothing is pasted
            box = np.zeros(4, np.int64)
        partner_trial = int(trials[rng.integers(trials.size)])
        partner_anchor = int(rng.integers(windows.BEHIND, lengths[partner_trial]))
        return SampleDraw(m, trial, anchor, box, partner_trial, partner_anchor)

    def locate(self, batch: int, row: int) -> tuple[int, int]:
        """(epoch, position in the epoch) of row `row` of this host's batch `batch`."""
        epoch, step = divmod(batch, self.steps_per_epoch)
        return epoch, step * self.batch_size + self.shard_index * self.local_batch_size + row

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        """Grain map function: sample `index` of this host's flat sample sequence."""
        batch, row = divmod(int(index), self.local_batch_size)
        draw = self.draw(*self.locate(batch, row))
        return build_sample(self.mice[draw.mouse], draw, self.num_neurons, self.arrays)


class TrainStream:
    """Training batches with a resumable state: `set_state(get_state())` on a fresh stream
    continues exactly there. Close it (or use it as a context manager) to stop the workers."""

    def __init__(self, dataset: SensoriumDataset | str | os.PathLike, config: Any, *,
                 fold: int | None, num_epochs: int | None = None, shard_index: int = 0,
                 shard_count: int = 1, read_threads: int = 2):
        """`config`: the experiment config (seed and config.data); `fold`: the validation fold
        left out (None: all folds); `num_epochs`: None for an endless stream; `shard_index`
        of `shard_count`: this host's share of every global batch (multi-host)."""
        d = config.data
        if d.batch_size % shard_count:
            raise ValueError(f"batch size {d.batch_size} is not divisible by {shard_count} "
                             "shards")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard index {shard_index} not in 0..{shard_count - 1}")
        self.dataset = (dataset if isinstance(dataset, SensoriumDataset)
                        else SensoriumDataset.open(dataset))
        self.samples = TrainSamples(self.dataset.mice, config, fold, shard_index, shard_count)
        self.steps_per_epoch = self.samples.steps_per_epoch
        self.num_batches = (_ENDLESS_BATCHES if num_epochs is None
                            else num_epochs * self.steps_per_epoch)
        self.num_neurons = self.samples.num_neurons
        self._read = read_options(read_threads, 2)
        self._workers = grain.MultiprocessingOptions(
            num_workers=d.num_workers, per_worker_buffer_size=d.prefetch_buffer_size)
        local = self.samples.local_batch_size
        self._batches = grain.MapDataset.range(self.num_batches * local).map(self.samples).batch(
            local, drop_remainder=True)
        self._next = 0
        self._iterator: Any = None

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._next // self.steps_per_epoch

    def _start(self) -> Any:
        ds = self._batches[self._next:].to_iter_dataset(self._read)
        if self._workers.num_workers > 0:
            ds = ds.mp_prefetch(self._workers)
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
        s = self.samples
        return {"fold": s.fold, "batch_size": s.batch_size, "epoch_size": s.epoch_size,
                "seed": s.seed, "cutmix_alpha": s.cutmix_alpha, "cutmix_prob": s.cutmix_prob,
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
        iterator, self._iterator = self._iterator, None
        if hasattr(iterator, "close"):
            iterator.close()

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


def device_inputs(batch: Mapping[str, jax.Array | np.ndarray],
                  rows: int = windows.CANVAS) -> jax.Array:
    """The model input of a batch of any stream: (B, 16, rows, 64, 5) float32 (the canvas's
    middle rows), jit-able; for a training batch (one with a `box`) the CutMix partner's trace
    planes inside the box."""
    return windows.expand_inputs(batch["frames"], batch["traces"], batch.get("box"),
                                 batch.get("partner_traces"), rows=rows)
