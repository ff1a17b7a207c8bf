"""The Sensorium 2023 dataset as it lies on disk: mice, tiers, trial lengths, labels.

Opening a root is cheap (the real one is 148 GB): the meta files, the trial folders and row 0
of one or two arrays per trial for the lengths. Files are memory-mapped, never unpickled, and
each way one can be wrong is a `DatasetError` naming it. Layout: docs/original.md#data-layout.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TIERS = ("train", "oracle", "live_test_main", "live_test_bonus", "final_test_main",
         "final_test_bonus", "none")
TEST_TIERS = ("live_test_main", "live_test_bonus", "final_test_main", "final_test_bonus")
MODALITIES = ("videos", "responses", "behavior", "pupil_center")
VIDEO_HEIGHT, VIDEO_WIDTH = 36, 64

# The original's readout order: the five NEW mice (scored, submitted) first, then the OLD ones.
REAL_MICE: tuple[tuple[str, int], ...] = (
    ("dynamic29515-10-12-Video-9b4f6a1a067fe51e15306b9628efea20", 7863),
    ("dynamic29623-4-9-Video-9b4f6a1a067fe51e15306b9628efea20", 7908),
    ("dynamic29647-19-8-Video-9b4f6a1a067fe51e15306b9628efea20", 8202),
    ("dynamic29712-5-9-Video-9b4f6a1a067fe51e15306b9628efea20", 7939),
    ("dynamic29755-2-8-Video-9b4f6a1a067fe51e15306b9628efea20", 8122),
    ("dynamic29156-11-10-Video-8744edeac3b4d1ce16b680916b5267ce", 7440),
    ("dynamic29228-2-10-Video-8744edeac3b4d1ce16b680916b5267ce", 7928),
    ("dynamic29234-6-9-Video-8744edeac3b4d1ce16b680916b5267ce", 8285),
    ("dynamic29513-3-5-Video-8744edeac3b4d1ce16b680916b5267ce", 7671),
    ("dynamic29514-2-9-Video-8744edeac3b4d1ce16b680916b5267ce", 7495),
)
NEW_MICE = tuple(name for name, _ in REAL_MICE[:5])
OLD_MICE = tuple(name for name, _ in REAL_MICE[5:])
MOUSE_NAME_PATTERN = re.compile(r"dynamic\d+-\d+-\d+-Video-[0-9a-f]{32}")

# Dummy-zero detection looks at this many trials of a tier and this many neurons of each:
# enough to tell real deconvolved traces from zeros without reading gigabytes at open time.
_DUMMY_PROBE_TRIALS = 3
_DUMMY_PROBE_NEURONS = 256


class DatasetError(ValueError):
    """Malformed data on disk; the message names the file and the problem."""


class DummyLabelsWarning(UserWarning):
    """An old mouse's test tier holds dummy zero responses instead of the real labels."""


def first_nan(row: np.ndarray) -> int:
    """Index of the first NaN of a 1-D series, or its length when it has none."""
    nan = np.isnan(np.asarray(row))
    return int(np.argmax(nan)) if nan.any() else int(nan.size)


# np.load parses .npy headers with ast.literal_eval, not thread-safe in CPython 3.11: Grain's read
# threads rarely raised "SystemError: AST constructor recursion depth mismatch" in our tests
# (python/cpython#106905). Every .npy or .npz the package reads is opened under this lock.
NPY_LOCK = threading.Lock()


def load_npy(path: Path, ndim: int | None = None, what: str = "") -> np.ndarray:
    """Memory-maps one .npy file (with `ndim` dimensions, `what` naming them, if given)."""
    if not path.is_file():
        raise DatasetError(f"{path}: file is missing")
    try:
        with NPY_LOCK:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        if isinstance(err, ValueError) and re.search("object|pickle", str(err), re.IGNORECASE):
            raise DatasetError(f"{path}: holds a pickled object array") from None
        raise DatasetError(f"{path}: is not a readable .npy file ({err})") from None
    if ndim is not None and array.ndim != ndim:
        raise DatasetError(f"{path}: has {array.ndim} dimensions {array.shape}, expected {ndim} "
                           f"({what})")
    return array


def check_float(path: Path, array: np.ndarray) -> None:
    if array.dtype.kind != "f":
        raise DatasetError(f"{path}: has dtype {array.dtype}, expected floats (NaN pads the tail)")


def _check_trial_files(mouse_path: Path, num_trials: int) -> None:
    """Every modality folder must hold exactly the files 0.npy .. K-1.npy for K tiers."""
    expected = {f"{i}.npy" for i in range(num_trials)}
    for modality in MODALITIES:
        folder = mouse_path / "data" / modality
        if not folder.is_dir():
            raise DatasetError(f"{folder}: folder is missing")
        names = {n for n in os.listdir(folder) if n.endswith(".npy")}
        if missing := expected - names:
            first = min(missing, key=lambda n: int(n[:-4]))
            raise DatasetError(f"{folder / first}: file is missing ({len(missing)} trial files "
                               f"of {num_trials} missing in this folder)")
        if extra := sorted(n for n in names - expected if n[:-4].isdigit()):
            raise DatasetError(f"{folder / extra[0]}: trial file has no row in tiers.npy, which "
                               f"lists {num_trials} trials")


@dataclass(frozen=True)
class Trial:
    """One fully validated trial; arrays are memory maps with time on the last axis."""

    video: np.ndarray  # (36, 64, T)
    responses: np.ndarray | None  # (neurons, T), None when the trial is unlabeled
    behavior: np.ndarray  # (2, T): pupil dilation, running speed
    pupil_center: np.ndarray  # (2, T): horizontal, vertical
    length: int  # valid frames; frames length..T-1 are NaN


@dataclass(eq=False)
class Mouse:
    """One mouse folder: meta data in memory, trial arrays memory-mapped on demand. `index`: the
    readout index; `is_real_old`: one of the five real old mice (not submitted); `lengths`
    (trials,): first NaN of responses row 0 when the trial is labeled, else of behavior row 0."""

    name: str
    index: int
    path: Path
    tiers: np.ndarray = field(repr=False)  # (trials,) from meta/trials/tiers.npy
    unit_ids: np.ndarray = field(repr=False)  # (neurons,) from meta/neurons/unit_ids.npy
    cell_coordinates: np.ndarray = field(repr=False)  # (neurons, 3) um, unused by the model
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
        if unknown := sorted(set(tiers) - set(TIERS)):
            raise ValueError(f"unknown tiers {unknown}; tiers are {TIERS}")
        return np.flatnonzero(np.isin(self.tiers, tiers))

    def path_of(self, modality: str, trial_id: int) -> Path:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; modalities are {MODALITIES}")
        if not 0 <= int(trial_id) < self.num_trials:
            raise IndexError(f"{self.name} has trials 0..{self.num_trials - 1}, not {trial_id}")
        return self.path / "data" / modality / f"{int(trial_id)}.npy"

    def _load_neurons(self, path: Path, what: str) -> np.ndarray:
        array = load_npy(path, 2, what)
        if array.shape[0] != self.num_neurons:
            raise DatasetError(f"{path}: has {array.shape[0]} neurons, but unit_ids.npy "
                               f"lists {self.num_neurons}")
        return array

    def load(self, modality: str, trial_id: int) -> np.ndarray:
        """Memory-maps one trial array and checks its dimensions, shape and dtype."""
        path = self.path_of(modality, trial_id)
        if modality == "videos":
            array = load_npy(path, 3, "height, width, time")
            if array.shape[:2] != (VIDEO_HEIGHT, VIDEO_WIDTH):
                raise DatasetError(f"{path}: has frames of {array.shape[:2]}, expected "
                                   f"({VIDEO_HEIGHT}, {VIDEO_WIDTH})")
        elif modality == "responses":
            array = self._load_neurons(path, "neurons, time")
        else:
            array = load_npy(path, 2, "2 rows, time")
            if array.shape[0] != 2:
                raise DatasetError(f"{path}: has {array.shape[0]} rows, expected 2")
        check_float(path, array)
        return array

    def load_trial(self, trial_id: int) -> Trial:
        """One trial, validated: array lengths, valid lengths, finite inside, NaN only as tail."""
        arrays = {m: self.load(m, trial_id) for m in MODALITIES}
        labeled = self.is_labeled(trial_id)
        length = int(self.lengths[trial_id])
        for m in MODALITIES:
            if m == "responses" and not labeled:
                continue
            path, array = self.path_of(m, trial_id), np.asarray(arrays[m])
            # The video (always present) is the reference for the array length.
            if array.shape[-1] != arrays["videos"].shape[-1]:
                raise DatasetError(f"{path}: has {array.shape[-1]} frames but the trial's video "
                                   f"has {arrays['videos'].shape[-1]}")
            own = first_nan(array[0, 0] if m == "videos" else array[0])
            if own != length:
                raise DatasetError(f"{path}: is {own} frames long (first NaN) but the trial is "
                                   f"{length} frames long")
            inside = ~np.isfinite(array[..., :length]).all(axis=tuple(range(array.ndim - 1)))
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
                     length=length)

    def response_mean(self) -> np.ndarray:
        """meta/statistics/responses/all/mean.npy: (neurons, frames) float32, NaN past the
        longest trial."""
        return self._response_statistic("mean")

    def response_std(self) -> np.ndarray:
        """meta/statistics/responses/all/std.npy: (neurons, frames) float32."""
        return self._response_statistic("std")

    def _response_statistic(self, name: str) -> np.ndarray:
        path = self.path / "meta" / "statistics" / "responses" / "all" / f"{name}.npy"
        array = self._load_neurons(path, "neurons, frames")
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


def _read_tiers(path: Path) -> np.ndarray:
    tiers = load_npy(path, 1, "one tier string per trial")
    if tiers.dtype.kind == "S":
        tiers = np.char.decode(tiers, "ascii")
    if tiers.dtype.kind != "U":
        raise DatasetError(f"{path}: has dtype {tiers.dtype}, expected unicode tier strings")
    if unknown := sorted(set(np.unique(tiers).tolist()) - set(TIERS)):
        raise DatasetError(f"{path}: holds unknown tier strings {unknown}; tiers are {TIERS}")
    return np.asarray(tiers)


def _open_mouse(path: Path, index: int) -> Mouse:
    for sub in ("data", "meta"):
        if not (path / sub).is_dir():
            raise DatasetError(f"{path / sub}: folder is missing")
    tiers = _read_tiers(path / "meta" / "trials" / "tiers.npy")
    ids_path = path / "meta" / "neurons" / "unit_ids.npy"
    unit_ids = load_npy(ids_path, 1, "one id per neuron")
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
    _check_trial_files(path, tiers.shape[0])
    mouse = Mouse(name=path.name, index=index, path=path, tiers=tiers,
                  unit_ids=np.array(unit_ids), cell_coordinates=np.array(coords),
                  is_real_old=path.name in OLD_MICE, labeled_tiers=frozenset({"train", "oracle"}),
                  lengths=np.zeros(tiers.shape[0], np.int64))
    if mouse.is_real_old:
        # Old mice's test labels count only once the real responses replaced the dummy zeros.
        mouse.labeled_tiers = mouse.labeled_tiers | _real_test_tiers(mouse)
    for trial_id in range(mouse.num_trials):
        behavior = mouse.load("behavior", trial_id)
        mouse.lengths[trial_id] = first_nan(behavior[0])
        if mouse.is_labeled(trial_id):
            responses = mouse.load("responses", trial_id)
            if responses.shape[-1] != behavior.shape[-1]:
                raise DatasetError(f"{mouse.path_of('responses', trial_id)}: has "
                                   f"{responses.shape[-1]} frames but the trial's behavior has "
                                   f"{behavior.shape[-1]}")
            # Labeled trials take their length from neuron 0 (the original's rule).
            mouse.lengths[trial_id] = first_nan(responses[0])
    return mouse


@dataclass(eq=False)
class SensoriumDataset:
    """All mouse folders under a root, in readout order."""

    root: Path
    mice: list[Mouse]

    @classmethod
    def open(cls, root: str | os.PathLike) -> SensoriumDataset:
        """Opens the mouse folders (real naming pattern) under `root`: new real mice, then
        unknown mice by name, then old real mice (the original's order)."""
        root = Path(root).absolute()
        if not root.is_dir():
            raise DatasetError(f"{root}: dataset root folder is missing")
        names = {p.name for p in root.iterdir()
                 if p.is_dir() and MOUSE_NAME_PATTERN.fullmatch(p.name)}
        if not names:
            raise DatasetError(f"{root}: holds no mouse folder named like "
                               "dynamic<digits>-<digits>-<digits>-Video-<32 hex digits>")
        order = ([n for n in NEW_MICE if n in names] + sorted(names - set(NEW_MICE + OLD_MICE))
                 + [n for n in OLD_MICE if n in names])
        mice = [_open_mouse(root / name, i) for i, name in enumerate(order)]
        known = dict(REAL_MICE)
        if set(known) <= names:
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
        if not isinstance(name_or_index, str):
            return self.mice[name_or_index]
        if name_or_index not in self.names:
            raise KeyError(f"no mouse {name_or_index!r} under {self.root}")
        return self.mice[self.names.index(name_or_index)]

    def find(self, key: str) -> Mouse:
        """The mouse a user named on a command line: folder name, readout index or unique prefix."""
        hits = [m for m in self.mice if m.name == key] or (
            [self.mice[int(key)]] if key.isdigit() and int(key) < len(self.mice)
            else [m for m in self.mice if m.name.startswith(key)])
        if len(hits) != 1:
            raise KeyError(f"{self.root}: {'more than one' if hits else 'no'} mouse is {key!r} "
                           f"(give a folder name, a readout index 0-{len(self.mice) - 1} or a "
                           f"unique prefix of a name); its mice are {self.names}")
        return hits[0]

    def summary(self) -> str:
        """A text table: mouse, neurons, trials per tier, labeled tiers, valid length range."""
        short = [t.replace("_test", "") for t in TIERS]
        rows = [["idx", "mouse", "neurons", *short, "labeled", "length", "kind"]]
        for m in self.mice:
            counts = [str(int(np.sum(m.tiers == t))) for t in TIERS]
            labeled = ",".join(s for t, s in zip(TIERS, short, strict=True)
                               if t in m.labeled_tiers)
            kind = "old" if m.is_real_old else ("new" if m.name in NEW_MICE else "unknown")
            span = f"{m.lengths.min()}-{m.lengths.max()}" if m.num_trials else "-"
            rows.append([str(m.index), m.name, str(m.num_neurons), *counts, labeled, span, kind])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        lines.append(f"{len(self.mice)} mice, {sum(self.num_neurons)} neurons, root {self.root}")
        return "\n".join(lines)


if __name__ == "__main__":  # the command lives in value_check (which imports this module)
    from dwise_jax.data import value_check

    sys.exit(value_check.main())
