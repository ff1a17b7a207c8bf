"""`python -m dwise_jax.data.sensorium ROOT [--check]`: a dataset root's summary, its seven
folds' balance, and with --check every trial validated and every value held to the mouse's own
statistics (`meta/statistics/<modality>/all`).

A value more than `RANGE_WIDTHS` recorded ranges outside its channel's recorded range is
implausible (docs/data.md#values-the-datasets-statistics-rule-out).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from absl import flags

from dwise_jax import cli
from dwise_jax.data import folds, sensorium
from dwise_jax.data.sensorium import DatasetError, Mouse, SensoriumDataset, check_float, load_npy

RANGE_WIDTHS = 10.0
STD_WIDTHS = 10.0
ERRORS = (DatasetError,)  # the command's users' to fix: one `error:` line, exit 1
_ROW_NAMES = {"behavior": ("pupil dilation", "running speed"),
              "pupil_center": ("horizontal", "vertical")}


@dataclass(frozen=True)
class Bounds:
    """Allowed values [low, high] of one modality of one mouse: (channels,) float64, or (1,)
    for every channel. They lie `RANGE_WIDTHS` x `span` (the modality's whole recorded range)
    outside the recorded range: min.npy/max.npy if `from_range`, else mean.npy +- 10 std.npy."""

    modality: str
    folder: Path
    low: np.ndarray
    high: np.ndarray
    recorded_low: np.ndarray
    recorded_high: np.ndarray
    from_range: bool
    span: float

    def describe(self, value: float, channel: int, where: str) -> str:
        """The message for `value` of `channel` at `where` (e.g. 'frame 10')."""
        per_channel = self.low.shape[0] > 1
        c = channel if per_channel else 0
        above = value > self.high[c]
        what = _channel_name(self.modality, channel) if per_channel else (
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
    return f"row {channel} ({_ROW_NAMES[modality][channel]})"


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
    if not from_range:
        mean, std = _read(folder, "mean"), _read(folder, "std")
        if mean is None or std is None or np.shape(mean) != np.shape(std):
            return None
        mean, std = np.asarray(mean, np.float64), np.abs(np.asarray(std, np.float64))
        lo, hi = mean - STD_WIDTHS * std, mean + STD_WIDTHS * std
    rec_lo, rec_hi = _per_channel(lo, channels, np.nanmin), _per_channel(hi, channels, np.nanmax)
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
        bounds = {m: b for m in sensorium.MODALITIES
                  if (b := modality_bounds(mouse, m)) is not None}
        mouse.__dict__["_value_bounds"] = bounds
    return bounds


def _offense(mouse: Mouse, trial: int, bounds: Bounds, array: np.ndarray,
             frames: np.ndarray | None = None) -> str | None:
    """The message naming the value of `array` (as on disk: channels first, time last) farthest
    outside `bounds` (NaN ignored), or None. `frames`: the trial frames of a window's times."""
    low, high = bounds.low, bounds.high
    per_channel = low.shape[0] > 1 and bounds.modality != "videos"
    low, high = (low[:, None], high[:, None]) if per_channel else (low[0], high[0])
    axis = -1 if per_channel else None
    with np.errstate(invalid="ignore"):
        # The cheap test first: the extremes (per channel) against the bounds.
        if ((array.min(axis=axis, keepdims=True) >= low).all()
                and (array.max(axis=axis, keepdims=True) <= high).all()):
            return None
        excess = np.maximum(array - high, low - array)  # > 0 outside; NaN stays NaN
        if not np.nanmax(excess, initial=0.0) > 0:
            return None
    index = tuple(int(i) for i in np.unravel_index(int(np.nanargmax(excess)), array.shape))
    where = (f"frame {index[-1]}" if frames is None
             else f"frame {int(frames[index[-1]])} of trial {trial}")
    if bounds.modality == "videos":
        channel, where = 0, f"pixel ({index[0]}, {index[1]}), {where}"
    else:
        channel, where = index[0], f"{_channel_name(bounds.modality, index[0])}, {where}"
    return (f"{mouse.path_of(bounds.modality, trial)}: "
            + bounds.describe(float(array[index]), channel, where))


def scan_trial(mouse: Mouse, trial: int, arrays: dict[str, np.ndarray] | None = None,
               ) -> list[str]:
    """One message per trial file of `trial` whose values contradict the statistics (the file's
    most extreme value); [] when all are plausible. `arrays` are the trial's arrays if loaded."""
    messages = []
    for modality, bounds in mouse_bounds(mouse).items():
        # Unlabeled trials' dummy responses are checked too: zeros are plausible values.
        array = (arrays or {}).get(modality)
        array = mouse.load(modality, trial) if array is None else array
        if message := _offense(mouse, trial, bounds, np.asarray(array)):
            messages.append(message)
    return messages


def check_window(bounds: dict[str, Bounds], mouse: Mouse, trial: int,
                 frame_indexes: np.ndarray, frames: np.ndarray, traces: np.ndarray,
                 target: np.ndarray | None) -> None:
    """Raises DatasetError naming the file, trial and frame if a window as `load_window` returns
    it (frames at the trial's `frame_indexes`) contradicts `bounds` (= `mouse_bounds(mouse)`); a
    ReLU'd value is out only if the file's was."""
    parts = {"videos": np.moveaxis(frames, 0, -1), "behavior": traces[:, :2].T,
             "pupil_center": traces[:, 2:].T}
    if target is not None:
        parts["responses"] = target.T
    for modality, values in parts.items():
        if modality in bounds and (
                message := _offense(mouse, trial, bounds[modality], values, frame_indexes)):
            raise DatasetError(message)


# ----------------------------------------------------------------------------- the command
def check_all(dataset: SensoriumDataset, offenses: list[str]) -> int:
    """Validates every trial and std file of every mouse, appending each trial's `scan_trial`
    lines to `offenses` (scanning on); returns the number of trials."""
    for mouse in dataset.mice:
        mouse.response_std()
        for trial_id in range(mouse.num_trials):
            trial = mouse.load_trial(trial_id)
            offenses += scan_trial(mouse, trial_id, {
                "videos": trial.video, "behavior": trial.behavior,
                "pupil_center": trial.pupil_center, "responses": trial.responses})
    return sum(mouse.num_trials for mouse in dataset.mice)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_boolean("check", False, "Load and validate every trial, and hold every value to "
                         "the mouse's meta/statistics.", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
    if len(args) != 1:
        raise cli.UsageError(f"expected one argument, the dataset ROOT (got {len(args)})")
    dataset = SensoriumDataset.open(args[0])
    print(dataset.summary())
    if fv.check:
        offenses: list[str] = []
        count = check_all(dataset, offenses)
        for line in offenses:
            print(f"error: {line}", file=sys.stderr)
        if offenses:
            print(f"checked {count} trials: {len(offenses)} trial files hold values that "
                  "contradict the dataset's own statistics (listed on stderr)")
            return 1
        print(f"checked {count} trials: all valid, every value within its statistics")
    print("\ntrials per fold (perceptual video hash % 7):")
    print(folds.format_fold_balance(folds.fold_balance(dataset.mice)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command in process (`argv` without the program name; default: sys.argv). It lives
    here because `python -m dwise_jax.data.sensorium` runs that module as `__main__`, whose own
    `DatasetError` is not the class the dataset raises; this module's import of it is."""
    return cli.call(define_flags, run, sys.argv[1:] if argv is None else argv,
                    "python -m dwise_jax.data.sensorium", __doc__, errors=ERRORS)
