"""`python -m dwise_jax.data.sensorium ROOT [--check]`: a dataset root's summary, its seven
folds' balance, and with --check every trial validated and every value held to the mouse's own
meta/statistics (`value_check`).
"""

from __future__ import annotations

import sys

from absl import flags

from dwise_jax import cli
from dwise_jax.data import folds, value_check
from dwise_jax.data.sensorium import DatasetError, SensoriumDataset

ERRORS = (DatasetError,)  # the command's users' to fix: one `error:` line, exit 1


def check_all(dataset: SensoriumDataset, offenses: list[str] | None = None) -> int:
    """Validates every trial and std file of every mouse; returns the number of trials.

    With `offenses`, also appends one line per trial file holding a value that contradicts the
    mouse's own meta/statistics (`value_check.scan_trial`), and goes on scanning.
    """
    count = 0
    for mouse in dataset.mice:
        mouse.response_std()
        for trial_id in range(mouse.num_trials):
            trial = mouse.load_trial(trial_id)
            if offenses is not None:
                offenses += value_check.scan_trial(mouse, trial_id, {
                    "videos": trial.video, "behavior": trial.behavior,
                    "pupil_center": trial.pupil_center, "responses": trial.responses})
            count += 1
    return count


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
    """The command in process (`argv` without the program name; default: sys.argv).

    `python -m dwise_jax.data.sensorium` calls it: that module runs as `__main__`, so its own
    `DatasetError` is not the class the dataset raises; this module's import of it is.
    """
    return cli.call(define_flags, run, sys.argv[1:] if argv is None else argv,
                    "python -m dwise_jax.data.sensorium", __doc__, errors=ERRORS)
