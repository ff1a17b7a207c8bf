"""The Sensorium 2023 dataset as it lies on disk: mice, tiers, trial lengths, labels.

Opening a root is cheap (the real one is 148 GB): the meta files, the trial folders and row 0
of one or two arrays per trial for the lengths. Files are memory-mapped, never unpickled;
`Mouse.load_trial` validates a whole trial. Layout: docs/original.md#data-layout.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dwise_jax.data.layout import (
    MODALITIES,
    MOUSE_NAME_PATTERN,
    NEW_MICE,
    OLD_MICE,
    REAL_MICE,
    TEST_TIERS,
    TIERS,
    VIDEO_HEIGHT,
    VIDEO_WIDTH,
    DatasetError,
    check_float,
    check_ndim,
    check_trial_files,
    first_nan,
    load_npy,
    read_tiers,
)

# The layout's names are re-exported: readers import them from here.
__all__ = [
    "MODALITIES", "MOUSE_NAME_PATTERN", "NEW_MICE", "OLD_MICE", "REAL_MICE", "TEST_TIERS",
    "TIERS", "VIDEO_HEIGHT", "VIDEO_WIDTH", "DatasetError", "DummyLabelsWarning", "Mouse",
    "SensoriumDataset", "Trial", "check_float", "check_ndim", "check_trial_files", "first_nan",
    "load_npy", "read_tiers",
]

# Dummy-zero detection looks at this many trials of a tier and this many neurons of each:
# enough to tell real deconvolved traces from zeros without reading gigabytes at open time.
_DUMMY_PROBE_TRIALS = 3
_DUMMY_PROBE_NEURONS = 256


class DummyLabelsWarning(UserWarning):
    """An old mouse's test tier holds dummy zero responses instead of the real labels."""


@dataclass(frozen=True)
class Trial:
    """One fully validated trial; arrays are memory maps with time on the last axis."""

    video: np.ndarray  # (36, 64, T)
    responses: np.ndarray | None  # (neurons, T), None when the trial is unlabeled
    behavior: np.ndarray  # (2, T): pupil dilation, running speed
    pupil_center: np.ndarray  # (2, T): horizontal, vertical
    length: int  # valid frames; frames length..T-1 are NaN
    trial_id: int = -1
    tier: str = ""


@dataclass(eq=False)
class Mouse:
    """One mouse folder: meta data in memory, trial arrays memory-mapped on demand.

    Attributes:
        name, index, path: folder name, readout index (position in the dataset), folder.
        tiers: (trials,) tier string per trial id; unit_ids: (neurons,) submission ids;
        cell_coordinates: (neurons, 3) um, never used by the model.
        is_real_old: one of the five real old mice (not submitted; test labels downloadable).
        labeled_tiers: tiers whose response files hold real labels.
        lengths: (trials,) valid frames per trial: first NaN of responses row 0 when the
            trial is labeled, else of behavior row 0.
    """

    name: str
    index: int
    path: Path
    tiers: np.ndarray = field(repr=False)
    unit_ids: np.ndarray = field(repr=False)
    cell_coordinates: np.ndarray = field(repr=False)
    is_real_old: bool
    labeled_tiers: frozenset[str]
    lengths: np.ndarray = field(repr=False)

    @property
    def num_neurons(self) -> int:
        return int(self.unit_ids.shape[0])

    @property
    def num_trials(self) -> int:
        return int(self.tiers.shape[0])

    @property
    def submitted(self) -> bool:
        """New and unknown mice are scored and submitted; the real old mice are not."""
        return not self.is_real_old

    def is_labeled(self, trial_id: int) -> bool:
        return str(self.tiers[trial_id]) in self.labeled_tiers

    def trial_ids(self, tiers: Iterable[str] | str) -> np.ndarray:
        """Trial ids (ascending) whose tier is one of `tiers`."""
        tiers = (tiers,) if isinstance(tiers, str) else tuple(tiers)
        unknown = sorted(set(tiers) - set(TIERS))
        if unknown:
            raise ValueError(f"unknown tiers {unknown}; tiers are {TIERS}")
        return np.flatnonzero(np.isin(self.tiers, tiers))

    def path_of(self, modality: str, trial_id: int) -> Path:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; modalities are {MODALITIES}")
        if not 0 <= int(trial_id) < self.num_trials:
            raise IndexError(f"{self.name} has trials 0..{self.num_trials - 1}, not {trial_id}")
        return self.path / "data" / modality / f"{int(trial_id)}.npy"

    def load(self, modality: str, trial_id: int) -> np.ndarray:
        """Memory-maps one trial array and checks its dimensions, shape and dtype."""
        path = self.path_of(modality, trial_id)
        array = load_npy(path)
        if modality == "videos":
            check_ndim(path, array, 3, "height, width, time")
            if array.shape[:2] != (VIDEO_HEIGHT, VIDEO_WIDTH):
                raise DatasetError(f"{path}: has frames of {array.shape[:2]}, expected "
                                   f"({VIDEO_HEIGHT}, {VIDEO_WIDTH})")
        elif modality == "responses":
            check_ndim(path, array, 2, "neurons, time")
            if array.shape[0] != self.num_neurons:
                raise DatasetError(f"{path}: has {array.shape[0]} neurons, but unit_ids.npy "
                                   f"lists {self.num_neurons}")
        else:
            check_ndim(path, array, 2, "2 rows, time")
            if array.shape[0] != 2:
                raise DatasetError(f"{path}: has {array.shape[0]} rows, expected 2")
        check_float(path, array)
        return array

    def load_trial(self, trial_id: int) -> Trial:
        """One trial, validated: array lengths, valid lengths, finite inside, NaN only as tail."""
        arrays = {m: self.load(m, trial_id) for m in MODALITIES}
        labeled = self.is_labeled(trial_id)
        checked = [m for m in MODALITIES if labeled or m != "responses"]
        # The video (always present) is the reference for the array length.
        t_array = arrays["videos"].shape[-1]
        for m in checked:
            if arrays[m].shape[-1] != t_array:
                raise DatasetError(f"{self.path_of(m, trial_id)}: has {arrays[m].shape[-1]} "
                                   f"frames but the trial's video has {t_array}")
        length = int(self.lengths[trial_id])
        for m in checked:
            path, array = self.path_of(m, trial_id), np.asarray(arrays[m])
            row0 = array[0, 0] if m == "videos" else array[0]
            own = first_nan(row0)
            if own != length:
                raise DatasetError(f"{path}: is {own} frames long (first NaN) but the trial is "
                                   f"{length} frames long")
            frame_axes = tuple(range(array.ndim - 1))
            inside = ~np.isfinite(array[..., :length]).all(axis=frame_axes)
            if inside.any():
                frame = int(np.argmax(inside))
                kind = "NaN" if np.isnan(array[..., frame]).any() else "inf"
                raise DatasetError(f"{path}: holds {kind} inside the trial at frame {frame} "
                                   f"(valid length {length})")
            if not np.isnan(array[..., length:]).all():
                raise DatasetError(f"{path}: holds values after the NaN tail starts at frame "
                                   f"{length}")
        return Trial(video=arrays["videos"], responses=arrays["responses"] if labeled else None,
                     behavior=arrays["behavior"], pupil_center=arrays["pupil_center"],
                     length=length, trial_id=int(trial_id), tier=str(self.tiers[trial_id]))

    def response_mean(self) -> np.ndarray:
        """meta/statistics/responses/all/mean.npy: (neurons, frames) float32, one mean per
        frame (NaN past the longest trial)."""
        return self._response_statistic("mean")

    def response_std(self) -> np.ndarray:
        """meta/statistics/responses/all/std.npy: (neurons, frames) float32, one std per frame."""
        return self._response_statistic("std")

    def _response_statistic(self, name: str) -> np.ndarray:
        path = self.path / "meta" / "statistics" / "responses" / "all" / f"{name}.npy"
        array = load_npy(path)
        check_ndim(path, array, 2, "neurons, frames")
        if array.shape[0] != self.num_neurons:
            raise DatasetError(f"{path}: has {array.shape[0]} neurons, but unit_ids.npy lists "
                               f"{self.num_neurons}")
        check_float(path, array)
        return array.astype(np.float32, copy=False)


def _real_test_tiers(mouse: Mouse) -> set[str]:
    """Test tiers of a real old mouse whose response files hold the real labels."""
    real = set()
    for tier in TEST_TIERS:
        ids = mouse.trial_ids(tier)
        if ids.size == 0:
            continue
        probe = ids[np.unique(np.linspace(0, ids.size - 1, _DUMMY_PROBE_TRIALS).astype(int))]
        zeros = {}
        for trial_id in probe:
            block = np.asarray(mouse.load("responses", trial_id)[:_DUMMY_PROBE_NEURONS])
            zeros[int(trial_id)] = not np.any(block[np.isfinite(block)])
        if not any(zeros.values()):
            real.add(tier)
        elif all(zeros.values()):
            warnings.warn(f"{mouse.name}: the {tier} responses are dummy zeros (e.g. "
                          f"{mouse.path_of('responses', probe[0])}); those trials count as "
                          "unlabeled. Download the real labels (docs/original.md#data-layout) "
                          "to train on them.",
                          DummyLabelsWarning, stacklevel=4)
        else:
            bad = next(t for t, z in zeros.items() if z)
            raise DatasetError(f"{mouse.path_of('responses', bad)}: holds dummy zeros while other "
                               f"{tier} trials hold real labels (an incomplete label download)")
    return real


def _open_mouse(path: Path, index: int) -> Mouse:
    for sub in ("data", "meta"):
        if not (path / sub).is_dir():
            raise DatasetError(f"{path / sub}: folder is missing")
    tiers = read_tiers(path / "meta" / "trials" / "tiers.npy")
    ids_path = path / "meta" / "neurons" / "unit_ids.npy"
    unit_ids = load_npy(ids_path)
    check_ndim(ids_path, unit_ids, 1, "one id per neuron")
    if unit_ids.dtype.kind not in "iu":
        raise DatasetError(f"{ids_path}: has dtype {unit_ids.dtype}, expected integers")
    ids, counts = np.unique(unit_ids, return_counts=True)
    if (counts > 1).any():  # the submission names each neuron by its unit id
        dup, times = int(ids[counts > 1][0]), int(counts[counts > 1][0])
        raise DatasetError(f"{ids_path}: lists unit id {dup} {times} times; unit ids must be "
                           "unique")
    coords_path = path / "meta" / "neurons" / "cell_motor_coordinates.npy"
    coords = load_npy(coords_path)
    if coords.shape != (unit_ids.shape[0], 3):
        raise DatasetError(f"{coords_path}: has shape {coords.shape}, expected "
                           f"({unit_ids.shape[0]}, 3) for the neurons of unit_ids.npy")
    check_trial_files(path, tiers.shape[0])
    is_real_old = path.name in OLD_MICE
    mouse = Mouse(name=path.name, index=index, path=path, tiers=tiers,
                  unit_ids=np.array(unit_ids), cell_coordinates=np.array(coords),
                  is_real_old=is_real_old, labeled_tiers=frozenset({"train", "oracle"}),
                  lengths=np.zeros(tiers.shape[0], np.int64))
    if is_real_old:
        # Old mice's test labels count only once the real responses replaced the dummy zeros.
        mouse.labeled_tiers = mouse.labeled_tiers | _real_test_tiers(mouse)
    for trial_id in range(mouse.num_trials):
        behavior = mouse.load("behavior", trial_id)
        length = first_nan(behavior[0])
        if mouse.is_labeled(trial_id):
            responses = mouse.load("responses", trial_id)
            if responses.shape[-1] != behavior.shape[-1]:
                raise DatasetError(f"{mouse.path_of('responses', trial_id)}: has "
                                   f"{responses.shape[-1]} frames but the trial's behavior has "
                                   f"{behavior.shape[-1]}")
            # Labeled trials take their length from neuron 0 (the original's rule).
            length = first_nan(responses[0])
        mouse.lengths[trial_id] = length
    return mouse


def _mouse_order(names: Iterable[str]) -> list[str]:
    """New real mice, then unknown mice by name, then old real mice (the original's order)."""
    names = set(names)
    unknown = sorted(names - set(NEW_MICE) - set(OLD_MICE))
    return ([n for n in NEW_MICE if n in names] + unknown + [n for n in OLD_MICE if n in names])


@dataclass(eq=False)
class SensoriumDataset:
    """All mouse folders under a root, in readout order."""

    root: Path
    mice: list[Mouse]

    @classmethod
    def open(cls, root: str | os.PathLike) -> SensoriumDataset:
        """Discovers the mouse folders (real naming pattern) under `root` and opens each."""
        root = Path(root).absolute()
        if not root.is_dir():
            raise DatasetError(f"{root}: dataset root folder is missing")
        names = [p.name for p in root.iterdir()
                 if p.is_dir() and MOUSE_NAME_PATTERN.fullmatch(p.name)]
        if not names:
            raise DatasetError(f"{root}: holds no mouse folder named like "
                               "dynamic<digits>-<digits>-<digits>-Video-<32 hex digits>")
        mice = [_open_mouse(root / name, i) for i, name in enumerate(_mouse_order(names))]
        known = dict(REAL_MICE)
        if set(known) <= set(names):
            # Only a complete real dataset must match the real neuron counts; partial or
            # fake roots may reuse the real names with other sizes.
            for mouse in mice:
                if mouse.name in known and mouse.num_neurons != known[mouse.name]:
                    raise DatasetError(
                        f"{mouse.path / 'meta' / 'neurons' / 'unit_ids.npy'}: lists "
                        f"{mouse.num_neurons} neurons but the real {mouse.name} has "
                        f"{known[mouse.name]}")
        return cls(root=root, mice=mice)

    @property
    def num_neurons(self) -> list[int]:
        return [m.num_neurons for m in self.mice]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.mice]

    def mouse(self, name_or_index: str | int) -> Mouse:
        if isinstance(name_or_index, str):
            for m in self.mice:
                if m.name == name_or_index:
                    return m
            raise KeyError(f"no mouse {name_or_index!r} under {self.root}")
        return self.mice[name_or_index]

    def summary(self) -> str:
        """A text table: mouse, neurons, trials per tier, labeled tiers, valid length range."""
        short = [t.replace("_test", "") for t in TIERS]
        head = ["idx", "mouse", "neurons", *short, "labeled", "length", "kind"]
        rows = [head]
        for m in self.mice:
            counts = [str(int(np.sum(m.tiers == t))) for t in TIERS]
            labeled = ",".join(s for t, s in zip(TIERS, short, strict=True)
                               if t in m.labeled_tiers)
            kind = "old" if m.is_real_old else ("new" if m.name in NEW_MICE else "unknown")
            span = f"{m.lengths.min()}-{m.lengths.max()}" if m.num_trials else "-"
            rows.append([str(m.index), m.name, str(m.num_neurons), *counts, labeled, span, kind])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        total = sum(self.num_neurons)
        lines.append(f"{len(self.mice)} mice, {total} neurons, root {self.root}")
        return "\n".join(lines)


if __name__ == "__main__":  # the command lives in dataset_check (which imports this module)
    from dwise_jax.data import dataset_check

    sys.exit(dataset_check.main())
