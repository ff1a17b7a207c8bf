"""Values that contradict the dataset's own statistics (`meta/statistics/<modality>/all`).

A value more than `RANGE_WIDTHS` recorded ranges outside its channel's recorded range is
implausible (docs/data.md#values-the-datasets-statistics-rule-out). `scan_trial` reads whole
trial files (`--check`); `check_window` tests the window a loader just read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dwise_jax.data.layout import DatasetError, check_float, load_npy
from dwise_jax.data.sensorium import Mouse

RANGE_WIDTHS = 10.0
STD_WIDTHS = 10.0
CHECKED = ("videos", "responses", "behavior", "pupil_center")
_ROW_NAMES = {"behavior": ("pupil dilation", "running speed"),
              "pupil_center": ("horizontal", "vertical")}


@dataclass(frozen=True)
class Bounds:
    """Allowed values of one modality of one mouse.

    Attributes:
      low, high: (channels,) float64 allowed bounds, or (1,) for one bound for every channel.
      recorded_low, recorded_high: the recorded range they derive from, same shape.
      from_range: True when from min.npy/max.npy, False when from mean.npy +- 10 std.npy.
      span: the modality's whole recorded range (max of max - min of min), the margin's unit.
    """

    modality: str
    folder: Path
    low: np.ndarray
    high: np.ndarray
    recorded_low: np.ndarray
    recorded_high: np.ndarray
    from_range: bool
    span: float

    def channel_index(self, channel: int) -> int:
        return channel if self.low.shape[0] > 1 else 0

    def describe(self, value: float, channel: int, where: str) -> str:
        """The message for `value` of `channel` at `where` (e.g. 'frame 10')."""
        c = self.channel_index(channel)
        above = value > self.high[c]
        what = _channel_name(self.modality, channel) if self.low.shape[0] > 1 else (
            "any pixel" if self.modality == "videos" else "any row")
        if self.from_range:
            stat = self.folder / ("max.npy" if above else "min.npy")
            recorded = (f"{stat} records at {'most' if above else 'least'} "
                        f"{_fmt(self.recorded_high[c] if above else self.recorded_low[c])} for "
                        f"{what}")
        else:
            recorded = (f"{self.folder}/mean.npy and std.npy put {what} within "
                        f"[{_fmt(self.recorded_low[c])}, {_fmt(self.recorded_high[c])}] "
                        f"(mean +- {STD_WIDTHS:g} std)")
        limit = (f"up to {_fmt(self.high[c])}: that maximum plus" if above
                 else f"down to {_fmt(self.low[c])}: that minimum minus")
        return (f"holds {_fmt(value)} at {where}, which contradicts the dataset's own statistics: "
                f"{recorded} (allowed {limit} {RANGE_WIDTHS:g} x {_fmt(self.span)}, the whole "
                f"recorded range of {self.modality})")


def _fmt(x: float) -> str:
    return f"{float(x):.4g}"


def _channel_name(modality: str, channel: int) -> str:
    if modality == "responses":
        return f"neuron {channel}"
    if modality in _ROW_NAMES:
        return f"row {channel} ({_ROW_NAMES[modality][channel]})"
    return f"channel {channel}"


def _per_channel(array: np.ndarray, channels: int | None, reduce) -> np.ndarray:
    """(channels,) reduction over every axis but the first when the statistic is per channel,
    else (1,) over everything."""
    array = np.asarray(array, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN channels stay NaN
        if channels is not None and array.ndim >= 1 and array.shape[0] == channels:
            return reduce(array.reshape(channels, -1), axis=1)
        return np.atleast_1d(reduce(array))


def _read(folder: Path, name: str) -> np.ndarray | None:
    path = folder / f"{name}.npy"
    if not path.is_file():
        return None
    array = load_npy(path)
    check_float(path, array)
    return array


def modality_bounds(mouse: Mouse, modality: str) -> Bounds | None:
    """The allowed values of `modality` from `<mouse>/meta/statistics/<modality>/all`, or None
    when it has no min/max nor mean/std."""
    folder = mouse.path / "meta" / "statistics" / modality / "all"
    channels = {"videos": None, "responses": mouse.num_neurons}.get(modality, 2)
    lo, hi = _read(folder, "min"), _read(folder, "max")
    from_range = lo is not None and hi is not None
    if from_range:
        rec_lo, rec_hi = _per_channel(lo, channels, np.nanmin), _per_channel(hi, channels,
                                                                             np.nanmax)
    else:
        mean, std = _read(folder, "mean"), _read(folder, "std")
        if mean is None or std is None or np.shape(mean) != np.shape(std):
            return None
        mean, std = np.asarray(mean, np.float64), np.abs(np.asarray(std, np.float64))
        rec_lo = _per_channel(mean - STD_WIDTHS * std, channels, np.nanmin)
        rec_hi = _per_channel(mean + STD_WIDTHS * std, channels, np.nanmax)
    if rec_lo.shape != rec_hi.shape:  # min per channel, max not (or the reverse): one range
        rec_lo, rec_hi = np.atleast_1d(np.nanmin(rec_lo)), np.atleast_1d(np.nanmax(rec_hi))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        whole_lo, whole_hi = np.nanmin(rec_lo), np.nanmax(rec_hi)
    if not (np.isfinite(whole_lo) and np.isfinite(whole_hi)):
        return None  # no recorded value at all (or infinite ones): nothing to hold values to
    # Channels never recorded (all NaN) get the modality's whole range.
    rec_lo = np.where(np.isnan(rec_lo), whole_lo, rec_lo)
    rec_hi = np.where(np.isnan(rec_hi), whole_hi, rec_hi)
    span = whole_hi - whole_lo
    if span <= 0:  # one constant recorded value: allow its own magnitude (or 1) around it
        span = max(abs(whole_lo), abs(whole_hi)) or 1.0
    return Bounds(modality=modality, folder=folder, low=rec_lo - RANGE_WIDTHS * span,
                  high=rec_hi + RANGE_WIDTHS * span, recorded_low=rec_lo, recorded_high=rec_hi,
                  from_range=from_range, span=float(span))


def mouse_bounds(mouse: Mouse) -> dict[str, Bounds]:
    """{modality: Bounds} of the modalities with statistics; computed once per Mouse object (kept
    on it, so Grain workers that receive it after the first window get them too)."""
    bounds = mouse.__dict__.get("_value_bounds")
    if bounds is None:
        bounds = {m: b for m in CHECKED if (b := modality_bounds(mouse, m)) is not None}
        mouse.__dict__["_value_bounds"] = bounds
    return bounds


def _first_violation(bounds: Bounds, array: np.ndarray, channel_axis: int | None,
                     ) -> tuple[tuple[int, ...], float] | None:
    """(index, value) of the value of `array` farthest outside `bounds` (NaN ignored), or None;
    `channel_axis` None: one bound for every value."""
    array = np.asarray(array)
    if bounds.low.shape[0] > 1 and channel_axis is not None:
        shape = [1] * array.ndim
        shape[channel_axis] = -1
        low, high = bounds.low.reshape(shape), bounds.high.reshape(shape)
    else:
        low, high = bounds.low[0], bounds.high[0]
    with np.errstate(invalid="ignore"):
        excess = np.maximum(array - high, low - array)  # > 0 outside; NaN stays NaN
        if not np.nanmax(excess, initial=0.0) > 0:
            return None
    index = np.unravel_index(int(np.nanargmax(excess)), array.shape)
    return tuple(int(i) for i in index), float(array[index])


def scan_trial(mouse: Mouse, trial: int, arrays: dict[str, np.ndarray] | None = None,
               ) -> list[str]:
    """One message per trial file of `trial` whose values contradict the statistics (the file's
    most extreme value); [] when all are plausible. `arrays` are the trial's arrays if loaded."""
    messages = []
    for modality, bounds in mouse_bounds(mouse).items():
        # Unlabeled trials' dummy responses are checked too: zeros are plausible values.
        array = (arrays or {}).get(modality)
        if array is None:
            array = mouse.load(modality, trial)
        array = np.asarray(array)
        if modality == "videos":
            found = _first_violation(bounds, array, None)
            if found:
                (row, col, frame), value = found
                messages.append(f"{mouse.path_of(modality, trial)}: " + bounds.describe(
                    value, 0, f"pixel ({row}, {col}), frame {frame}"))
        else:
            found = _first_violation(bounds, array, 0)
            if found:
                (channel, frame), value = found
                messages.append(f"{mouse.path_of(modality, trial)}: " + bounds.describe(
                    value, channel, f"{_channel_name(modality, channel)}, frame {frame}"))
    return messages


def check_window(bounds: dict[str, Bounds], mouse: Mouse, trial: int,
                 frame_indexes: np.ndarray, frames: np.ndarray, traces: np.ndarray,
                 target: np.ndarray | None) -> None:
    """Raises DatasetError naming the file, trial and frame when a loaded window holds a value
    that contradicts the statistics (`bounds` = `mouse_bounds(mouse)`).

    frame_indexes (16,) are the window's frames in the trial; frames (16, 36, 64), traces
    (16, 4) and target (16, neurons) as `window_reader.load_window` returns them (a ReLU'd
    value is outside the bounds only if the file's value was).
    """
    parts = [("videos", frames, None), ("behavior", traces[:, :2], 1),
             ("pupil_center", traces[:, 2:], 1)]
    if target is not None:
        parts.append(("responses", target, 1))
    for modality, values, channel_axis in parts:
        b = bounds.get(modality)
        if b is None:
            continue
        # The cheap test: the window's extremes (per channel) against the bounds.
        if channel_axis is None or b.low.shape[0] == 1:
            if b.low[0] <= values.min() and values.max() <= b.high[0]:
                continue
        elif _within(b, values):
            continue
        found = _first_violation(b, values, channel_axis)
        if found is None:
            continue
        index, value = found
        frame = int(frame_indexes[index[0]])
        if modality == "videos":
            channel, where = 0, f"pixel ({index[1]}, {index[2]}), frame {frame} of trial {trial}"
        else:
            channel = index[1]
            where = f"{_channel_name(modality, channel)}, frame {frame} of trial {trial}"
        raise DatasetError(f"{mouse.path_of(modality, trial)}: " + b.describe(value, channel,
                                                                              where))


def _within(bounds: Bounds, values: np.ndarray) -> bool:
    """Per-channel test of (time, channels) values."""
    return bool((values.min(axis=0) >= bounds.low).all() and
                (values.max(axis=0) <= bounds.high).all())
