"""`python -m dwise_jax.ensemble --experiments a,b --split SPLIT`: the mean of experiments.

As the original (docs/original.md#prediction): the experiments' fold-blended predictions of
each trial (what `python -m dwise_jax.predict` wrote) are averaged, arithmetic mean, and written
as the predictions of an experiment named after the sorted names joined by commas, e.g.
`distillation_001,true_batch_001`:

    <workdir>/predictions/<a,b>/<split>/<mouse>/<trial>.npy   + manifest.json

with the competition file for a test split, and the scores and report (under
`<workdir>/reports/<a,b>/<split>/`) where the split is scored, as predict does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from dwise_jax import predict, report, sharding
from dwise_jax.data.sensorium import SensoriumDataset


def ensemble_name(experiments: list[str]) -> str:
    """The ensemble's experiment name: the sorted names joined by commas (the original's)."""
    return ",".join(sorted(experiments))


def ensemble_split(workdir: str | Path, experiments: list[str], split: str, *,
                   data_root: str | None = None) -> dict:
    """Averages the experiments' predictions of `split`; returns predict.finish's result."""
    predict.check_split(split)
    names = sorted(set(experiments))
    if len(names) < 2:
        raise predict.PredictionError(f"an ensemble needs two or more experiments, got {names}")
    manifests = {e: predict.read_manifest(predict.predictions_dir(workdir, e, split),
                                          predict.predict_command(e, split, workdir))
                 for e in names}
    first, *others = names
    trials = manifests[first]["trials"]
    for other in others:
        if manifests[other]["trials"] != trials:
            mice = sorted(set(trials) | set(manifests[other]["trials"]))
            differ = [m for m in mice if trials.get(m) != manifests[other]["trials"].get(m)]
            raise predict.PredictionError(
                f"{predict.predictions_dir(workdir, other, split)}: predicts other trials than "
                f"{first} (mice {differ}); predict both with the same folds and data")
    roots = {m["data_root"] for m in manifests.values()}
    if not data_root and len(roots) > 1:
        raise predict.PredictionError(f"the experiments predicted different data roots "
                                      f"{sorted(roots)}; pass --data_root")
    dataset = SensoriumDataset.open(data_root or roots.pop())
    strides = {m["anchor_stride"] for m in manifests.values()}
    stride = strides.pop() if len(strides) == 1 else 0  # 0: mixed strides
    name = ensemble_name(names)
    directory = predict.predictions_dir(workdir, name, split)
    (directory / predict.MANIFEST).unlink(missing_ok=True)
    scorer = report.SplitScorer(dataset, split) if report.is_scored(dataset, split) else None
    for mouse_name, mouse_trials in trials.items():
        mouse = dataset.mouse(mouse_name)
        for trial in mouse_trials:
            arrays = [np.load(predict.predictions_dir(workdir, e, split) / mouse_name
                              / f"{trial}.npy", allow_pickle=False) for e in names]
            if any(a.shape != arrays[0].shape for a in arrays):
                raise predict.PredictionError(
                    f"{mouse_name} trial {trial}: the experiments' arrays differ in shape "
                    f"{[a.shape for a in arrays]}")
            mean = np.mean(np.stack(arrays).astype(np.float64), axis=0).astype(np.float32)
            predict.write_trial(directory, mouse_name, trial, mean)
            if scorer is not None:
                scorer.add(mouse, trial, {stride: mean}, main=stride)
    manifest = {"format": predict.MANIFEST_FORMAT, "experiment": name, "split": split,
                "experiments": names, "data_root": str(dataset.root), "anchor_stride": stride,
                "folds": [], "trials": trials}
    print(f"{name}: mean of {len(names)} experiments' {split} predictions -> {directory}")
    return predict.finish(dataset, name, split, directory, manifest, scorer, workdir)


def define_flags() -> None:
    flags.DEFINE_string("experiments", None, "Comma-separated experiment names.")
    flags.DEFINE_string("split", None, f"One of {', '.join(predict.SPLITS)}.")
    flags.DEFINE_string("workdir", "workdir", "Work folder holding predictions/.")
    flags.DEFINE_string("data_root", None,
                        "Dataset root (default: the one the predictions were made on).")


def main(argv: list[str]) -> int:
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not f.experiments or not f.split:
        raise app.UsageError("--experiments and --split are required")
    sharding.initialize_distributed()  # before any other JAX call (several processes)
    logging.set_verbosity(logging.WARNING)
    if not sharding.is_main_process():  # files only: process 0 does it all
        return 0
    try:
        ensemble_split(f.workdir, f.experiments.split(","), f.split, data_root=f.data_root)
    except predict.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
