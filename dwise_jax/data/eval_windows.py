"""Validation and prediction streams of fixed windows, and the mean blending of predictions.

Both are Grain datasets of whole batches, the same on every pass, the last batch padded with
`valid` False; formats, anchors and blending: docs/data.md#windows-and-batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import grain
import numpy as np

from dwise_jax.data import folds, windows
from dwise_jax.data.sensorium import Mouse, SensoriumDataset
from dwise_jax.data.window_reader import (
    TrialArrays,
    load_window,
    neuron_mask,
    pad_neurons,
    read_options,
)


def validation_windows(dataset: SensoriumDataset, fold: int) -> np.ndarray:
    """(windows, 3) int64 rows (mouse index, trial id, anchor) of the validation fold."""
    rows = [(mouse.index, int(t), int(a)) for mouse in dataset.mice
            for t in np.flatnonzero(folds.trial_folds(mouse) == fold) if mouse.is_labeled(int(t))
            for a in windows.validation_anchors(int(mouse.lengths[t]))]
    return np.array(rows, np.int64).reshape(-1, 3)


def prediction_windows(mouse: Mouse, trials: Iterable[int],
                       stride: int | Sequence[int] = 1) -> np.ndarray:
    """(windows, 3) int64 rows (mouse index, trial id, anchor): every anchor of each trial; with
    several strides, the union of their anchors (one pass feeds a `WindowBlender` each)."""
    strides = [int(stride)] if np.ndim(stride) == 0 else [int(s) for s in stride]
    rows = [(mouse.index, int(t), int(a)) for t in trials for a in np.unique(np.concatenate(
        [windows.prediction_anchors(int(mouse.lengths[t]), s) for s in strides]))]
    return np.array(rows, np.int64).reshape(-1, 3)


class WindowRecords:
    """Grain map function: row i of a window table -> one record of the eval batch formats."""

    def __init__(self, mice: Sequence[Mouse], rows: np.ndarray, with_targets: bool):
        self.mice = {m.index: m for m in mice}
        self.rows = rows
        self.with_targets = with_targets
        self.num_neurons = max(m.num_neurons for m in mice)
        self.arrays = TrialArrays()

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        m, trial, anchor = (int(v) for v in self.rows[index])
        valid = trial >= 0
        if valid:
            frames, traces, target = load_window(self.mice[m], trial, anchor, self.with_targets,
                                                 self.arrays)
        else:  # padding of the last batch
            frames = np.zeros((windows.WINDOW_FRAMES, windows.VIDEO_HEIGHT,
                               windows.VIDEO_WIDTH), np.float32)
            traces = np.zeros((windows.WINDOW_FRAMES, 4), np.float32)
            target = np.zeros((windows.WINDOW_FRAMES, 0), np.float32)
        record = {"frames": frames, "traces": traces, "trial": np.int32(trial),
                  "anchor": np.int32(anchor), "valid": np.bool_(valid)}
        if self.with_targets:
            record["mouse"] = np.int32(max(m, 0))
            record["targets"] = pad_neurons(target, self.num_neurons)
            record["neuron_mask"] = neuron_mask(self.mice[m].num_neurons if valid else 0,
                                                self.num_neurons)
        return record


def _batches(mice: Sequence[Mouse], rows: np.ndarray, with_targets: bool, batch_size: int,
             shard_index: int, shard_count: int, read_threads: int,
             read_buffer: int) -> grain.IterDataset:
    """Whole batches of the window table `rows`, padded with (-1, -1, -1) rows; this host's
    share: row r of global batch b on host h is window b * batch_size + h * local + r."""
    if batch_size % shard_count or not 0 <= shard_index < shard_count:
        raise ValueError(f"batch size {batch_size} must split into {shard_count} shards "
                         f"and shard index {shard_index} be one of them")
    local = batch_size // shard_count
    rows = np.concatenate([rows, np.full((-len(rows) % batch_size, 3), -1, np.int64)])
    rows = rows.reshape(-1, shard_count, local, 3)[:, shard_index].reshape(-1, 3)
    records = WindowRecords(mice, rows, with_targets)
    return grain.MapDataset.range(len(rows)).map(records).batch(
        local, drop_remainder=True).to_iter_dataset(read_options(read_threads, read_buffer))


def validation_batches(dataset: SensoriumDataset, fold: int, batch_size: int = 32, *,
                       shard_index: int = 0, shard_count: int = 1, read_threads: int = 2,
                       read_buffer: int = 2) -> grain.IterDataset:
    """Validation batches of every mouse's validation-fold windows (docs/data.md)."""
    return _batches(dataset.mice, validation_windows(dataset, fold), True, batch_size,
                    shard_index, shard_count, read_threads, read_buffer)


def prediction_batches(mouse: Mouse, trials: Iterable[int], batch_size: int = 32, *,
                       stride: int | Sequence[int] = 1, shard_index: int = 0,
                       shard_count: int = 1, read_threads: int = 2,
                       read_buffer: int = 2) -> grain.IterDataset:
    """Prediction batches of one mouse's trials (docs/data.md); labels are not read. `stride`:
    one anchor stride or several (the union of their windows, `prediction_windows`)."""
    return _batches([mouse], prediction_windows(mouse, trials, stride), False, batch_size,
                    shard_index, shard_count, read_threads, read_buffer)


class WindowBlender:
    """Accumulates window outputs into per-trial sums and counts; returns the mean blend."""

    def __init__(self, lengths: Mapping[int, int], num_neurons: int, stride: int | None = None):
        """`lengths`: {trial id: valid length}. `stride`: blend only the windows whose anchor is
        one of this anchor stride's (`windows.prediction_anchors`); None blends every window."""
        self.num_neurons = num_neurons
        self.sums = {int(t): np.zeros((num_neurons, int(n)), np.float64)
                     for t, n in lengths.items()}
        self.counts = {int(t): np.zeros(int(n), np.int64) for t, n in lengths.items()}
        self.anchors = None if stride is None else {
            int(t): set(windows.prediction_anchors(int(n), stride).tolist())
            for t, n in lengths.items()}

    def add(self, outputs: np.ndarray, batch: Mapping[str, np.ndarray]) -> None:
        """Adds (B, 16, >= N) outputs of a prediction batch; padded rows are skipped."""
        outputs = np.asarray(outputs)[..., : self.num_neurons]
        for b in np.flatnonzero(batch["valid"]):
            trial, anchor = int(batch["trial"][b]), int(batch["anchor"][b])
            if self.anchors is not None and anchor not in self.anchors[trial]:
                continue
            idx = windows.window_indexes(anchor)
            # One window's 16 indexes are distinct, so a fancy-index add is exact.
            self.sums[trial][:, idx] += outputs[b].T
            self.counts[trial][idx] += 1

    def result(self, trial: int) -> np.ndarray:
        """(N, L) float32: each frame's mean over the windows covering it (0 if none)."""
        return (self.sums[trial] / np.maximum(self.counts[trial], 1)).astype(np.float32)
