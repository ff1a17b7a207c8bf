"""Reading windows from the trial files: kept-open memory maps, checks that name the file.

Between `sensorium.py` and the Grain streams of `pipeline.py` and `eval_windows.py`: every way a
file can be broken becomes a `DatasetError` naming it, which reaches the main process as it is.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import grain
import numpy as np

from dwise_jax.data import value_check, windows
from dwise_jax.data.sensorium import DatasetError, Mouse

# Memory maps kept open per process: more than the real dataset's ~28000 trial files (10 mice,
# ~700 trials, 4 modalities) and well under Linux's default 65530 mappings per process.
MAX_OPEN_ARRAYS = 32768


class TrialArrays:
    """Checked memory maps of trial files, opened once per process and kept (LRU): re-opening
    per window made a sample twice as slow (docs/data.md#windows-and-batches). Each process
    (each Grain worker) fills its own cache; pickling sends an empty one."""

    def __init__(self):
        self._maps: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # Grain's read threads share one cache

    def load(self, mouse: Mouse, modality: str, trial: int) -> np.ndarray:
        """`mouse.load(modality, trial)`, memoised."""
        key = (str(mouse.path), modality, int(trial))
        with self._lock:
            if (array := self._maps.get(key)) is not None:
                self._maps.move_to_end(key)
                return array
        array = mouse.load(modality, trial)  # opens under sensorium.NPY_LOCK
        with self._lock:
            self._maps[key] = array
            while len(self._maps) > MAX_OPEN_ARRAYS:
                self._maps.popitem(last=False)
        return array

    def __reduce__(self) -> tuple[type, tuple]:
        return TrialArrays, ()


def load_window(mouse: Mouse, trial: int, anchor: int, targets: bool = True,
                arrays: TrialArrays | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Compact inputs and target of the window ending at `anchor` (>= 30) of a trial: frames
    (16, 36, 64), traces (16, 4) and ReLU'd targets (16, neurons), float32 (targets None unless
    `targets`). `arrays`: a cache of open maps (default: a fresh one). Raises DatasetError naming
    the file when it is missing, unreadable, too short, or holds NaN inside the trial or values
    the dataset's statistics rule out (`value_check`)."""
    arrays, trial_arrays = arrays or TrialArrays(), {}
    for modality in ("videos", "behavior", "pupil_center") + (("responses",) if targets else ()):
        array = arrays.load(mouse, modality, trial)
        if array.shape[-1] <= anchor:
            raise DatasetError(f"{mouse.path_of(modality, trial)}: has {array.shape[-1]} "
                               f"frames, but the trial is {mouse.lengths[trial]} frames long")
        trial_arrays[modality] = array
    try:
        frames, traces = windows.compact_window(trial_arrays["videos"], trial_arrays["behavior"],
                                                trial_arrays["pupil_center"], anchor)
        target = windows.window_targets(trial_arrays["responses"], anchor) if targets else None
    except OSError as err:  # an I/O error while the memory map is read
        raise DatasetError(f"{mouse.path_of('videos', trial)} (or its sibling files): read "
                           f"failed ({err})") from None
    # A window inside the valid length never holds NaN; one that does means a damaged file.
    for modality, values in (("videos", frames), ("behavior", traces[:, :2]),
                             ("pupil_center", traces[:, 2:]), ("responses", target)):
        if values is not None and not np.isfinite(values).all():
            raise DatasetError(f"{mouse.path_of(modality, trial)}: holds NaN or inf inside the "
                               f"trial, in the window of frames {anchor - windows.BEHIND}.."
                               f"{anchor}")
    # Values far outside the dataset's own statistics stop here, before they reach a gradient.
    bounds = mouse.__dict__.get("_value_bounds")
    if bounds is None:  # the first window of this mouse in this process reads the statistics
        bounds = value_check.mouse_bounds(mouse)
    value_check.check_window(bounds, mouse, trial, windows.window_indexes(anchor), frames,
                             traces, target)
    return frames, traces, target


def pad_neurons(targets: np.ndarray, num_neurons: int) -> np.ndarray:
    """(..., n) -> (..., num_neurons) float32, zeros past n."""
    out = np.zeros((*targets.shape[:-1], num_neurons), np.float32)
    out[..., : targets.shape[-1]] = targets
    return out


def neuron_mask(n: int, num_neurons: int) -> np.ndarray:
    """(num_neurons,) bool, True for the first n."""
    return np.arange(num_neurons) < n


def read_options(threads: int, buffer: int) -> grain.ReadOptions:
    """Grain's per-process reading: `threads` threads, `buffer` elements (batches) ahead."""
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
