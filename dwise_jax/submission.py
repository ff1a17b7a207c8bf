"""Competition submission files, exactly as the Sensorium 2023 servers take them: one brotli
parquet file per test split, a row per trial of the submitted mice (mouse, trial id ascending),
the prediction times the organisers' precision, cut to frames [50 : min(L, 300) - 1]
(docs/original.md#submission). Files are written under a temporary name and renamed."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dwise_jax import atomic
from dwise_jax.metrics import cut_frames

SPLIT_FILES = {
    "live_test_main": "predictions_live_main.parquet.brotli",
    "final_test_main": "predictions_final_main.parquet.brotli",
    "live_test_bonus": "predictions_live_test_bonus_ood.parquet.brotli",
    "final_test_bonus": "predictions_final_test_bonus_ood.parquet.brotli",
}
COLUMNS = ("mouse", "trial_indices", "prediction", "neuron_ids")


def precision(std: np.ndarray) -> np.ndarray:
    """The organisers' precision (neurons, frames) from a std file, float32."""
    std = np.asarray(std, np.float64)
    threshold = 0.01 * np.nanmean(std)
    with np.errstate(invalid="ignore", divide="ignore"):
        above = std > threshold  # NaN compares False: it takes the threshold branch
        out = np.where(above, 1.0 / np.where(above, std, 1.0), 1.0 / threshold)
    return out.astype(np.float32)


def trial_prediction(prediction: np.ndarray, trial_precision: np.ndarray) -> np.ndarray:
    """One trial's submitted array: (neurons, L) * precision[:, :L], then the submission cut."""
    length = prediction.shape[-1]
    return cut_frames(np.asarray(prediction, np.float32) * trial_precision[:, :length], length)


def _schema():
    import pyarrow as pa

    return pa.schema([("mouse", pa.string()), ("trial_indices", pa.int64()),
                      ("prediction", pa.list_(pa.list_(pa.float64()))),
                      ("neuron_ids", pa.list_(pa.int64()))])


def mouse_table(mouse: str, unit_ids: np.ndarray, std: np.ndarray,
                predictions: Mapping[int, np.ndarray]):
    """The rows of one mouse (trial ids ascending) as a pyarrow Table built from one float64
    buffer: a real mouse's test split is ~10^8 values, gigabytes as nested lists."""
    import pyarrow as pa

    prec, ids, trials = precision(std), np.asarray(unit_ids, np.int64), sorted(predictions)
    for trial in trials:
        if predictions[trial].shape[0] != len(ids):
            raise ValueError(f"mouse {mouse} trial {trial}: prediction has "
                             f"{predictions[trial].shape[0]} neurons, unit_ids has {len(ids)}")
    cut = [trial_prediction(predictions[t], prec).astype(np.float64) for t in trials]
    values = pa.array(np.concatenate([c.ravel() for c in cut]) if cut else np.zeros(0))
    # Inner lists: one per (trial, neuron) of that trial's frame count; outer: N per trial.
    frames = np.array([c.shape[1] for c in cut], np.int64)
    inner = np.concatenate([[0], np.cumsum(np.repeat(frames, len(ids)))])
    if inner[-1] >= 2**31:  # list offsets are int32: pass fewer trials per table
        raise ValueError(f"mouse {mouse}: {inner[-1]} values are too many for one table")
    outer = pa.array((np.arange(len(trials) + 1) * len(ids)).astype(np.int32))
    prediction = pa.ListArray.from_arrays(
        outer, pa.ListArray.from_arrays(inner.astype(np.int32), values))
    neuron_ids = pa.ListArray.from_arrays(outer, pa.array(np.tile(ids, len(trials))))
    return pa.Table.from_arrays(
        [pa.array([mouse] * len(trials), pa.string()), pa.array(trials, pa.int64()),
         prediction, neuron_ids], schema=_schema())


def write_tables(path: str | os.PathLike, tables: Iterable[Any]) -> Path:
    """Writes tables (e.g. `mouse_table`s made one at a time) as the row groups of one brotli
    parquet file, atomically."""
    import pyarrow.parquet as pq

    path = Path(path)
    with atomic.atomic_path(path, suffix=".parquet") as tmp:
        with pq.ParquetWriter(tmp, _schema(), compression="brotli") as writer:
            for table in tables:
                writer.write_table(table)
    return path


def split_file(directory: str | os.PathLike, split: str) -> Path:
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; submissions exist for {sorted(SPLIT_FILES)}")
    return Path(directory) / SPLIT_FILES[split]
