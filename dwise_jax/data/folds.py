"""The seven cross-validation folds, grouped by a perceptual hash of each trial's video, bit for
bit the original's (docs/original.md#folds). Each mouse's hashes are cached in the user's cache
folder, never in the dataset. A mouse is any object with `name`, `path`, `tiers`, `is_real_old`,
`labeled_tiers` and `load` (and `is_labeled` for `labeled_trials`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from dwise_jax import atomic
from dwise_jax.data.sensorium import NPY_LOCK, first_nan

NUM_FOLDS = 7
HASHED_FRAMES = 5
CACHE_ENV = "DWISE_JAX_CACHE"  # the cache folder (default: $XDG_CACHE_HOME or ~/.cache, /dwise_jax)
_CACHE_VERSION = 1

VideoLoader = Callable[[int], np.ndarray]


def frame_phash(frame: np.ndarray) -> int:
    """imagehash.phash of a (height, width) frame of floats in 0..255, as the original: an int,
    bits read row-major, most significant first."""
    # astype truncates (not rounds) like the original: only exact copies are sure to match.
    pixels = np.ascontiguousarray(np.asarray(frame).astype(np.uint8))
    bits = imagehash.phash(Image.fromarray(pixels)).hash
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


def video_hash_frames(length: int) -> list[int]:
    """The five frames hashed: range(step // 2, length, step)[:5], step = length // 5."""
    if length < HASHED_FRAMES:
        raise ValueError(f"a video needs at least {HASHED_FRAMES} frames to hash, got {length}")
    step = length // HASHED_FRAMES
    return list(range(step // 2, length, step))[:HASHED_FRAMES]


def video_length(video: np.ndarray) -> int:
    """Valid length of a video (36, 64, T): the first NaN of pixel (0, 0) over time, else T."""
    return first_nan(video[0, 0])


def video_hash(video: np.ndarray) -> int:
    """XOR of the phashes of the five chosen frames of a (height, width, time) video: an int in
    [0, 2**64), kept a Python int or np.uint64 (int64 overflows, float64 drops low bits)."""
    result = 0
    for index in video_hash_frames(video_length(video)):
        result ^= frame_phash(video[..., index])
    return result


def tiers_with_folds(is_real_old: bool, labeled_tiers: Collection[str]) -> frozenset[str]:
    """The tiers whose trials get a fold: for the five real old mice every labeled tier but
    ``none``; for every other mouse (new, simulated) ``train`` and ``oracle``."""
    return frozenset(labeled_tiers) - {"none"} if is_real_old else frozenset({"train", "oracle"})


@dataclasses.dataclass(frozen=True)
class FoldAssignment:
    """The folds of one mouse's trials: `tiers` (trials,) str as in tiers.npy, `hashes`
    (trials,) uint64 video hash (0 if not hashed), `folds` (trials,) int8, -1 without a fold."""

    tiers: np.ndarray
    hashes: np.ndarray
    folds: np.ndarray


def assign_folds(tiers: np.ndarray, load_video: VideoLoader, folded_tiers: Collection[str],
                 hashes: np.ndarray | None = None, hashed: np.ndarray | None = None,
                 ) -> FoldAssignment:
    """Hash the videos of the trials in ``folded_tiers`` not yet ``hashed`` (default: none; both
    (trials,) arrays updated in place) and give each its fold; ``tiers`` (trials,) str,
    ``load_video``: trial id -> (36, 64, T) video."""
    tiers = np.asarray(tiers).astype(str)
    hashes = np.zeros(len(tiers), np.uint64) if hashes is None else hashes
    hashed = np.zeros(len(tiers), bool) if hashed is None else hashed
    needs = np.isin(tiers, sorted(folded_tiers))
    for trial in np.flatnonzero(needs & ~hashed):
        hashes[trial] = np.uint64(video_hash(load_video(int(trial))))
        hashed[trial] = True
    folds = np.full(tiers.shape, -1, np.int8)
    # uint64 % 7 stays exact in uint64 arithmetic (no float or int64 on the way).
    folds[needs] = (hashes[needs] % np.uint64(NUM_FOLDS)).astype(np.int8)
    return FoldAssignment(tiers, np.where(needs, hashes, np.uint64(0)), folds)


# Folds per (mouse folder, tiers.npy size and mtime, fold tiers): computed once per run.
_MEMO: dict[tuple[Any, ...], FoldAssignment] = {}


def cache_file(mouse: Any) -> Path:
    """``<cache>/folds/<mouse>-<digest of its resolved path>.npz``: two datasets with the same
    mouse names do not share a file. The dataset itself is never written to."""
    base = os.environ.get(CACHE_ENV) or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dwise_jax"
    folder = Path(mouse.path).resolve()
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    return Path(base) / "folds" / f"{folder.name}-{digest}.npz"


def _read_cache(path: Path, stamp: tuple[int, int], num_trials: int) -> tuple[np.ndarray, ...]:
    """(hashes, hashed) from the cache; nothing hashed if it is missing, stale or malformed."""
    with NPY_LOCK, contextlib.suppress(Exception), np.load(path, allow_pickle=False) as f:
        if (int(f["version"]) == _CACHE_VERSION and tuple(f["stamp"].tolist()) == stamp
                and f["hashes"].shape == f["hashed"].shape == (num_trials,)
                and f["hashes"].dtype == np.uint64):
            return f["hashes"], f["hashed"].astype(bool)
    return np.zeros(num_trials, np.uint64), np.zeros(num_trials, bool)


def mouse_folds(mouse: Any) -> FoldAssignment:
    """The folds of a mouse's trials, computed once per run and cached (``cache_file``) with
    the size and mtime of tiers.npy; hashes carry over when the fold tiers change (e.g. once
    old mice's test labels are downloaded)."""
    tiers = np.asarray(mouse.tiers).astype(str)
    folded_tiers = tiers_with_folds(bool(mouse.is_real_old), mouse.labeled_tiers)
    load_video = functools.partial(mouse.load, "videos")
    try:
        st = (Path(mouse.path) / "meta" / "trials" / "tiers.npy").stat()
    except (OSError, TypeError):  # not on disk (TypeError: path None): no cache to key
        return assign_folds(tiers, load_video, folded_tiers)
    stamp = (int(st.st_size), int(st.st_mtime_ns))
    key = (str(Path(mouse.path).resolve()), stamp, folded_tiers)
    if key not in _MEMO:
        cache_path = cache_file(mouse)
        hashes, hashed = _read_cache(cache_path, stamp, len(tiers))
        known = int(hashed.sum())
        result = assign_folds(tiers, load_video, folded_tiers, hashes, hashed)
        if hashed.sum() > known:
            # Atomic, readable by others (a shared cache folder); an unwritable one is skipped.
            with contextlib.suppress(OSError), atomic.atomic_path(cache_path, ".npz") as tmp:
                np.savez(tmp, version=np.int64(_CACHE_VERSION), stamp=np.array(stamp),
                         hashes=hashes, hashed=hashed)
                tmp.chmod(0o644)
        for array in (result.tiers, result.hashes, result.folds):
            array.setflags(write=False)  # shared by every caller in this run
        _MEMO[key] = result
    return _MEMO[key]


def trial_folds(mouse: Any) -> np.ndarray:
    """(trials,) int8: the fold of each trial of ``mouse``, -1 where it has none."""
    return mouse_folds(mouse).folds


def labeled_trials(mouse: Any, fold_ids: Collection[int]) -> list[int]:
    """The labeled trials of ``mouse`` whose fold is one of ``fold_ids``, in trial order."""
    trial_fold = trial_folds(mouse)
    wanted = np.isin(trial_fold, list(fold_ids)) & (trial_fold >= 0)
    return [int(t) for t in np.flatnonzero(wanted) if mouse.is_labeled(int(t))]


def fold_counts(folds: np.ndarray) -> np.ndarray:
    """(NUM_FOLDS,) int64: number of trials per fold (trials with fold -1 are not counted)."""
    folds = np.asarray(folds)
    return np.bincount(folds[folds >= 0].astype(np.int64), minlength=NUM_FOLDS)


def fold_balance(mice: Iterable[Any]) -> dict[str, np.ndarray]:
    """Trials per fold for each mouse: {mouse name: (NUM_FOLDS,) int64}."""
    return {mouse.name: fold_counts(trial_folds(mouse)) for mouse in mice}


def format_fold_balance(balance: dict[str, np.ndarray]) -> str:
    """A plain-text table of ``fold_balance`` (one row per mouse and a total row)."""
    rows = [*balance.items(), ("total", sum(balance.values(), np.zeros(NUM_FOLDS, np.int64)))]
    lines = ["mouse".ljust(24) + "".join(f"{f'fold_{k}':>8}" for k in range(NUM_FOLDS))]
    lines += [name[:23].ljust(24) + "".join(f"{int(c):>8}" for c in counts)
              for name, counts in rows]
    return "\n".join(lines)
