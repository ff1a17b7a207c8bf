"""The Sensorium 2023 on-disk layout and safe reading of its .npy files.

Constants of the layout (tiers, modalities, frame size, the ten real mice in the original's
readout order) and the file-level checks every reader shares: each array is memory-mapped,
never unpickled, and each way a file can be wrong is a `DatasetError` naming the file.
`sensorium` builds mice and datasets on top of these.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

TIERS = (
    "train", "oracle", "live_test_main", "live_test_bonus",
    "final_test_main", "final_test_bonus", "none",
)
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

class DatasetError(ValueError):
    """Malformed data on disk; the message names the file and the problem."""


def first_nan(row: np.ndarray) -> int:
    """Index of the first NaN of a 1-D series, or its length when it has none."""
    nan = np.isnan(np.asarray(row))
    idx = int(np.argmax(nan)) if nan.size else 0
    return idx if nan.size and nan[idx] else int(nan.size)


def load_npy(path: Path) -> np.ndarray:
    """Memory-maps one .npy file, turning every way it can be unreadable into DatasetError."""
    if not path.is_file():
        raise DatasetError(f"{path}: file is missing")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        if "object" in str(err).lower() or "pickle" in str(err).lower():
            raise DatasetError(f"{path}: holds a pickled object array") from None
        raise DatasetError(f"{path}: is not a readable .npy file ({err})") from None
    except (OSError, EOFError) as err:
        raise DatasetError(f"{path}: is not a readable .npy file ({err})") from None


def check_float(path: Path, array: np.ndarray) -> None:
    if array.dtype.kind != "f":
        raise DatasetError(f"{path}: has dtype {array.dtype}, expected floats (NaN pads the tail)")


def check_ndim(path: Path, array: np.ndarray, ndim: int, what: str) -> None:
    if array.ndim != ndim:
        raise DatasetError(f"{path}: has {array.ndim} dimensions {array.shape}, expected {ndim} "
                           f"({what})")


def read_tiers(path: Path) -> np.ndarray:
    tiers = load_npy(path)
    check_ndim(path, tiers, 1, "one tier string per trial")
    if tiers.dtype.kind == "S":
        tiers = np.char.decode(tiers, "ascii")
    if tiers.dtype.kind != "U":
        raise DatasetError(f"{path}: has dtype {tiers.dtype}, expected unicode tier strings")
    tiers = np.asarray(tiers)
    unknown = sorted(set(np.unique(tiers).tolist()) - set(TIERS))
    if unknown:
        raise DatasetError(f"{path}: holds unknown tier strings {unknown}; tiers are {TIERS}")
    return tiers


def check_trial_files(mouse_path: Path, num_trials: int) -> None:
    """Every modality folder must hold exactly the files 0.npy .. K-1.npy for K tiers."""
    expected = {f"{i}.npy" for i in range(num_trials)}
    for modality in MODALITIES:
        folder = mouse_path / "data" / modality
        if not folder.is_dir():
            raise DatasetError(f"{folder}: folder is missing")
        names = {n for n in os.listdir(folder) if n.endswith(".npy")}
        missing = expected - names
        if missing:
            first = min(missing, key=lambda n: int(n[:-4]))
            raise DatasetError(f"{folder / first}: file is missing ({len(missing)} trial files "
                               f"of {num_trials} missing in this folder)")
        extra = sorted(n for n in names - expected if n[:-4].isdigit())
        if extra:
            raise DatasetError(f"{folder / extra[0]}: trial file has no row in tiers.npy, which "
                               f"lists {num_trials} trials")
