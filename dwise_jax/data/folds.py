"""The seven cross-validation folds, grouped by a perceptual hash of each trial's video.

The hash, which trials get a fold, each mouse's folds (cached in the user's cache folder, never
in the dataset) and a balance table. The hash must match the original bit for bit
(docs/original.md#folds, #fold-hash-is-bit-exact), or folds reshuffle. A mouse is any object
with `name`, `path`, `num_trials`, `tiers`, `is_real_old`, `labeled_tiers` and `load`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from dwise_jax.data.layout import first_nan

NUM_FOLDS = 7
FOLD_PREFIX = "fold_"
HASHED_FRAMES = 5
# New (submitted) mice have real labels only for these tiers; their test tiers keep their names.
NEW_MOUSE_FOLD_TIERS = frozenset({"train", "oracle"})
IGNORED_TIER = "none"
CACHE_ENV = "DWISE_JAX_CACHE"  # the cache folder (default: $XDG_CACHE_HOME or ~/.cache, /dwise_jax)
_CACHE_VERSION = 1

VideoLoader = Callable[[int], np.ndarray]


# --------------------------------------------------------------------------- hashing


def frame_phash(frame: np.ndarray) -> int:
    """imagehash.phash of a (height, width) frame of floats in 0..255, as the original: an int,
    bits read row-major, most significant first."""
    # astype truncates (not rounds) like the original; a pixel sitting on an integer can
    # therefore flip under tiny noise, which is why only exact copies are guaranteed to match.
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
    """XOR of the phashes of the five chosen frames of a (height, width, time) video.

    A Python int in [0, 2**64): keep it one, or np.uint64 (int64 overflows, float64 drops low
    bits, and either changes ``% 7``).
    """
    result = 0
    for index in video_hash_frames(video_length(video)):
        result ^= frame_phash(video[..., index])
    return result


def fold_of_hash(video_hash_value: int) -> int:
    """The fold of a video hash: hash % 7."""
    return int(video_hash_value) % NUM_FOLDS


def fold_tier(fold: int) -> str:
    """The tier name a trial of fold ``fold`` gets, e.g. ``fold_3``."""
    return f"{FOLD_PREFIX}{fold}"


# --------------------------------------------------------------------------- which trials


def tiers_with_folds(is_real_old: bool, labeled_tiers: Collection[str]) -> frozenset[str]:
    """The tiers whose trials get a fold: for the five real old mice every labeled tier but
    ``none``; for every other mouse (new, simulated) ``train`` and ``oracle``."""
    if is_real_old:
        return frozenset(labeled_tiers) - {IGNORED_TIER}
    return NEW_MOUSE_FOLD_TIERS


@dataclasses.dataclass(frozen=True)
class FoldAssignment:
    """The folds of one mouse's trials.

    Attributes:
        tiers: (trials,) str, the tiers as stored in tiers.npy.
        hashes: (trials,) uint64 video hash, 0 where the trial was not hashed.
        lengths: (trials,) int64 video length used for the frame choice, -1 if not hashed.
        folds: (trials,) int8 fold 0..6, -1 for trials without a fold.
    """

    tiers: np.ndarray
    hashes: np.ndarray
    lengths: np.ndarray
    folds: np.ndarray

    @property
    def tiers_after_folds(self) -> np.ndarray:
        """(trials,) str: ``fold_<k>`` for trials with a fold, the other tiers unchanged."""
        return apply_folds(self.tiers, self.folds)


def apply_folds(tiers: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Replace the tier of every trial with fold >= 0 by ``fold_<k>`` ((trials,) str)."""
    out = np.asarray(tiers).astype(object)
    for trial in np.flatnonzero(np.asarray(folds) >= 0):
        out[trial] = fold_tier(int(folds[trial]))
    return out.astype(str)


def _needs_fold(tiers: np.ndarray, folded_tiers: Collection[str]) -> np.ndarray:
    return np.isin(np.asarray(tiers).astype(str), sorted(folded_tiers))


def _hash_trials(
    trials: Iterable[int], load_video: VideoLoader, hashes: np.ndarray, lengths: np.ndarray
) -> None:
    for trial in trials:
        video = load_video(int(trial))
        lengths[trial] = video_length(video)
        hashes[trial] = np.uint64(video_hash(video))


def _folds_from_hashes(hashes: np.ndarray, needs: np.ndarray) -> np.ndarray:
    folds = np.full(hashes.shape, -1, np.int8)
    # uint64 % 7 stays exact in uint64 arithmetic (no float or int64 on the way).
    folds[needs] = (hashes[needs] % np.uint64(NUM_FOLDS)).astype(np.int8)
    return folds


def assign_folds(
    tiers: np.ndarray, load_video: VideoLoader, folded_tiers: Collection[str]
) -> FoldAssignment:
    """Hash the videos of the trials in ``folded_tiers`` and give each its fold.

    ``tiers``: (trials,) str, row = trial id; ``load_video``: trial id -> (36, 64, T) video.
    """
    tiers = np.asarray(tiers).astype(str)
    needs = _needs_fold(tiers, folded_tiers)
    hashes = np.zeros(tiers.shape, np.uint64)
    lengths = np.full(tiers.shape, -1, np.int64)
    _hash_trials(np.flatnonzero(needs), load_video, hashes, lengths)
    return FoldAssignment(tiers, hashes, lengths, _folds_from_hashes(hashes, needs))


# --------------------------------------------------------------------------- mice, caching

# Folds per (mouse folder, tiers.npy size and mtime, fold tiers): computed once per run.
_MEMO: dict[tuple[Any, ...], FoldAssignment] = {}


def clear_memo() -> None:
    """Forget the folds computed in this run (the on-disk caches stay)."""
    _MEMO.clear()


def _tiers_file(mouse: Any) -> Path:
    return Path(mouse.path) / "meta" / "trials" / "tiers.npy"


def cache_file(mouse: Any) -> Path:
    """``<cache>/folds/<mouse>-<digest of its resolved path>.npz``: two datasets with the same
    mouse names do not share a file. The dataset itself is never written to."""
    base = os.environ.get(CACHE_ENV) or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dwise_jax"
    folder = Path(mouse.path).resolve()
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    return Path(base) / "folds" / f"{folder.name}-{digest}.npz"


def _read_cache(path: Path, stamp: tuple[int, int], num_trials: int) -> dict[str, np.ndarray]:
    """The cached hashes, or an empty dict if the cache is missing, stale or malformed."""
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in ("version", "stamp", "hashed", "hashes", "lengths")}
    except Exception:  # any unreadable cache is simply recomputed
        return {}
    fresh = (
        int(data["version"]) == _CACHE_VERSION
        and tuple(int(v) for v in data["stamp"]) == stamp
        and all(data[k].shape == (num_trials,) for k in ("hashed", "hashes", "lengths"))
        and data["hashes"].dtype == np.uint64
    )
    return data if fresh else {}


def _write_cache(path: Path, stamp: tuple[int, int], arrays: dict[str, np.ndarray]) -> None:
    """Write the cache atomically (temp file + rename); silently skip if not writable."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=".folds-", suffix=".npz", delete=False
        ) as f:
            tmp = f.name
            np.savez(f, version=np.int64(_CACHE_VERSION), stamp=np.array(stamp), **arrays)
        os.chmod(tmp, 0o644)  # NamedTemporaryFile makes it 0600; a shared cache folder may be used
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def mouse_folds(mouse: Any) -> FoldAssignment:
    """The folds of a mouse's trials, computed once per run and cached (``cache_file``).

    The cache keeps every hash so far with the size and mtime of tiers.npy (stale or unreadable:
    ignored; folder not writable: not written), so hashes carry over when the fold tiers change
    (e.g. once old mice's test labels are downloaded).
    """
    tiers = np.asarray(mouse.tiers).astype(str)
    folded_tiers = tiers_with_folds(bool(mouse.is_real_old), mouse.labeled_tiers)
    try:
        st = _tiers_file(mouse).stat()
        stamp = (int(st.st_size), int(st.st_mtime_ns))
    except (OSError, TypeError):  # TypeError: an in-memory mouse with path None
        stamp = None
    if stamp is None:  # not on disk: nothing to key a cache on
        return assign_folds(tiers, lambda t: mouse.load("videos", t), folded_tiers)
    key = (str(Path(mouse.path).resolve()), stamp, folded_tiers)
    if key in _MEMO:
        return _MEMO[key]

    cache_path = cache_file(mouse)
    cached = _read_cache(cache_path, stamp, len(tiers))
    hashed = cached.get("hashed", np.zeros(len(tiers), bool)).astype(bool)
    hashes = cached.get("hashes", np.zeros(len(tiers), np.uint64)).copy()
    lengths = cached.get("lengths", np.full(len(tiers), -1, np.int64)).copy()
    needs = _needs_fold(tiers, folded_tiers)
    missing = np.flatnonzero(needs & ~hashed)
    if missing.size:
        _hash_trials(missing, lambda t: mouse.load("videos", t), hashes, lengths)
        hashed[missing] = True
        _write_cache(cache_path, stamp, {"hashed": hashed, "hashes": hashes, "lengths": lengths})
    hashes = np.where(needs, hashes, np.uint64(0))
    lengths = np.where(needs, lengths, -1)
    result = FoldAssignment(tiers, hashes, lengths, _folds_from_hashes(hashes, needs))
    for array in (result.tiers, result.hashes, result.lengths, result.folds):
        array.setflags(write=False)  # shared by every caller in this run
    _MEMO[key] = result
    return result


def trial_folds(mouse: Any) -> np.ndarray:
    """(trials,) int8: the fold of each trial of ``mouse``, -1 where it has none."""
    return mouse_folds(mouse).folds


def labeled_trials(mouse: Any, fold_ids: Collection[int]) -> list[int]:
    """The labeled trials of ``mouse`` whose fold is one of ``fold_ids``, in trial order."""
    trial_fold = trial_folds(mouse)
    wanted = np.isin(trial_fold, list(fold_ids)) & (trial_fold >= 0)
    return [int(t) for t in np.flatnonzero(wanted) if mouse.is_labeled(int(t))]


def fold_tiers(mouse: Any) -> np.ndarray:
    """(trials,) str: the mouse's tiers with ``fold_<k>`` for every trial that has a fold."""
    return mouse_folds(mouse).tiers_after_folds


# --------------------------------------------------------------------------- balance


def fold_counts(folds: np.ndarray) -> np.ndarray:
    """(NUM_FOLDS,) int64: number of trials per fold (trials with fold -1 are not counted)."""
    folds = np.asarray(folds)
    return np.bincount(folds[folds >= 0].astype(np.int64), minlength=NUM_FOLDS)


def fold_balance(mice: Iterable[Any]) -> dict[str, np.ndarray]:
    """Trials per fold for each mouse: {mouse name: (NUM_FOLDS,) int64}."""
    return {mouse.name: fold_counts(trial_folds(mouse)) for mouse in mice}


def format_fold_balance(balance: dict[str, np.ndarray]) -> str:
    """A plain-text table of ``fold_balance`` (one row per mouse and a total row)."""
    header = "mouse".ljust(24) + "".join(f"{fold_tier(k):>8}" for k in range(NUM_FOLDS))
    rows = [header]
    total = np.zeros(NUM_FOLDS, np.int64)
    for name, counts in balance.items():
        total += counts
        rows.append(name[:23].ljust(24) + "".join(f"{int(c):>8}" for c in counts))
    rows.append("total".ljust(24) + "".join(f"{int(c):>8}" for c in total))
    return "\n".join(rows)
