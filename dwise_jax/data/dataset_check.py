"""`python -m dwise_jax.data.sensorium ROOT [--check]`: a dataset root's summary, its seven
folds' balance, and with --check every trial validated and every value held to the mouse's own
meta/statistics (`value_check`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dwise_jax.data import folds, value_check
from dwise_jax.data.sensorium import DatasetError, SensoriumDataset


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dwise_jax.data.sensorium",
        description="Print a summary of a Sensorium 2023 root and its seven folds; "
                    "--check validates every trial.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--check", action="store_true",
                        help="load and validate every trial, and hold every value to the "
                             "mouse's meta/statistics")
    args = parser.parse_args(argv)
    try:
        dataset = SensoriumDataset.open(args.root)
        print(dataset.summary())
        if args.check:
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
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0

