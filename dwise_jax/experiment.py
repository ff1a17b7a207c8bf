"""A trained experiment on disk: its fold folders (`<workdir>/<experiment>/fold_<k>/`), their
models, and the predictions written for it (`<workdir>/predictions/<experiment>/<split>/`,
complete once manifest.json is written; docs/prediction.md). The public ground shared by
`predict`, `inference`, `reconstruct` and `mei`. A blend is the experiment `a,b`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dwise_jax import atomic, checkpoint, report, submission
from dwise_jax.data import folds
from dwise_jax.data.sensorium import TEST_TIERS, DatasetError, Mouse, SensoriumDataset

SPLITS = (*TEST_TIERS, "folds")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dwise_jax.predictions/1"
CHUNK_TRIALS = 8  # trials held at a time: bounds host memory (real trials: ~19 MB each)


class PredictionError(RuntimeError):
    """Prediction cannot run: missing folds or predictions, unknown split, mismatched model."""


USER_ERRORS = (PredictionError, DatasetError, checkpoint.CheckpointError)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise PredictionError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")


# --------------------------------------------------------------------------- fold models


def fold_folders(workdir: str | Path, experiment: str,
                 fold_ids: list[int] | None = None) -> dict[int, Path]:
    """{fold: folder} of the requested folds, or of every `fold_<k>` folder found."""
    root = Path(workdir) / experiment
    if fold_ids is None:
        fold_ids = [k for k in range(folds.NUM_FOLDS) if checkpoint.fold_dir(
            workdir, experiment, k).is_dir()]
        if not fold_ids:
            raise PredictionError(
                f"{root}: no fold folders (fold_0 .. fold_6); train them with `python -m "
                f"dwise_jax.train --config ...` or convert the original's weights with "
                f"`python -m dwise_jax.convert`")
    out = {}
    for k in fold_ids:
        if not 0 <= k < folds.NUM_FOLDS:
            raise PredictionError(f"folds must be in 0..{folds.NUM_FOLDS - 1}, got {k}")
        directory = checkpoint.fold_dir(workdir, experiment, k)
        if checkpoint.latest_step(directory) is None:
            raise PredictionError(f"{directory / checkpoint.CHECKPOINTS_DIR}: fold {k} of "
                                  f"{experiment} has no checkpoint")
        out[k] = directory
    return out


def experiments_in(workdir: str | Path) -> list[str]:
    """The experiments of a workdir: its folders with a fold_<k> that has a checkpoint."""
    root = Path(workdir)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and any(
        checkpoint.latest_step(checkpoint.fold_dir(root, p.name, k)) is not None
        for k in range(folds.NUM_FOLDS))) if root.is_dir() else []
    if not found:
        raise PredictionError(f"{root}: holds no trained experiment (<experiment>/fold_<k> with "
                              "a checkpoint); train one with `python -m dwise_jax.train --config "
                              "...` or pass --workdir")
    return found


def load_fold(directory: Path, fold: int):
    """A fold's EMA model (float32, eval mode), its spec and step; warns if its training has
    not finished (the run's step count is in model.json; converted weights have none)."""
    model, spec, step = checkpoint.load_ema_model(directory)
    total = spec.extra.get("total_steps")
    if total is not None and step < total:
        print(f"warning: fold {fold} checkpoint is at step {step} of {total}: its training "
              "has not finished", file=sys.stderr)
    return model, spec, step


def resolve_data_root(folders: dict[int, Path], data_root: str | None) -> str:
    """--data_root, else the data_root of the folds' config.json (which must agree)."""
    if data_root:
        return data_root
    roots = {json.loads((d / "config.json").read_text())["data_root"]
             for d in folders.values() if (d / "config.json").is_file()}
    if not roots:
        raise PredictionError(f"{next(iter(folders.values()))}: no config.json says which data "
                              "the folds were trained on (converted weights?); pass --data_root")
    if len(roots) > 1:
        raise PredictionError(f"the folds were trained on different data roots {sorted(roots)}; "
                              "pass --data_root")
    return roots.pop()


def readout_index(spec: checkpoint.ModelSpec, mouse: Mouse | str, where: Path | str) -> int:
    """The readout of a mouse (a name, or a Mouse whose neuron count is checked)."""
    name = mouse if isinstance(mouse, str) else mouse.name
    if name not in spec.mice:
        raise PredictionError(f"{where}: has no readout for mouse {name}; its readouts are "
                              f"{spec.mice}")
    index = spec.mice.index(name)
    if not isinstance(mouse, str) and spec.num_neurons[index] != mouse.num_neurons:
        raise PredictionError(
            f"{where}: readout {index} ({name}) has {spec.num_neurons[index]} neurons but "
            f"{mouse.path / 'meta/neurons/unit_ids.npy'} lists {mouse.num_neurons}; the "
            "checkpoint does not fit this dataset")
    return index


# --------------------------------------------------------------------------- predictions


def predictions_dir(workdir: str | Path, experiment: str, split: str) -> Path:
    return Path(workdir) / "predictions" / experiment / split


def blend_name(experiments: list[str]) -> str:
    """The blend's experiment name: the sorted names joined by commas (the original's)."""
    return ",".join(sorted(experiments))


def write_trial(directory: Path, mouse: str, trial: int, prediction: np.ndarray) -> None:
    with atomic.atomic_path(directory / mouse / f"{trial}.npy", suffix=".npy") as tmp:
        np.save(tmp, np.asarray(prediction, np.float32))


def read_manifest(workdir: str | Path, experiment: str, split: str) -> dict:
    path = predictions_dir(workdir, experiment, split) / MANIFEST
    if not path.is_file():
        raise PredictionError(
            f"{path}: missing (no complete predictions there); make them with `python -m "
            f"dwise_jax.predict --experiment {experiment} --split {split} --workdir {workdir}`")
    return json.loads(path.read_text())


def write_submission(dataset: SensoriumDataset, split: str, directory: Path,
                     trials: dict[str, list[int]]) -> Path | None:
    """The split's competition file from the written arrays: submitted mice, one at a time."""
    mice = [m for m in dataset.mice if m.submitted and trials.get(m.name)]
    if split not in submission.SPLIT_FILES or not mice:
        return None

    def tables():
        for mouse in mice:
            std, ids = mouse.response_std(), mouse.unit_ids
            chosen = sorted(trials[mouse.name])
            for start in range(0, len(chosen), CHUNK_TRIALS):
                preds = {t: np.load(directory / mouse.name / f"{t}.npy", allow_pickle=False)
                         for t in chosen[start:start + CHUNK_TRIALS]}
                yield submission.mouse_table(mouse.name, ids, std, preds)

    return submission.write_tables(submission.split_file(directory, split), tables())


def finish(dataset: SensoriumDataset, experiment: str, split: str, directory: Path,
           manifest: dict, scorer: report.SplitScorer | None, workdir: str | Path) -> dict:
    """Writes the manifest (marking the arrays complete), the submission and the report; returns
    {"directory", "manifest", "submission" (path or None), on scored splits "scores" and
    "report" (the Markdown file)}."""
    atomic.write_json(directory / MANIFEST, manifest)
    result = {"directory": directory, "manifest": manifest,
              "submission": write_submission(dataset, split, directory, manifest["trials"])}
    if result["submission"] is not None:
        print(f"submission: {result['submission']}")
    if scorer is not None:
        result["scores"] = scorer.summary()
        report.print_scores(result["scores"])
        out = Path(workdir) / "reports" / experiment / split
        result["report"] = report.write_report(out, result["scores"], scorer.examples, manifest)
        print(f"report: {result['report']}")
    return result


def blend_experiments(workdir: str | Path, experiments: list[str], split: str, *,
                      data_root: str | None = None) -> dict:
    """The arithmetic mean of the experiments' (fold-blended) predictions of `split`, written
    as the experiment `a,b` with its submission and report; returns `finish`'s result."""
    check_split(split)
    names = sorted(set(experiments))
    if len(names) < 2:
        raise PredictionError(f"a blend needs two or more experiments, got {names}")
    manifests = {e: read_manifest(workdir, e, split) for e in names}
    first, *others = names
    trials = manifests[first]["trials"]
    for other in others:
        if manifests[other]["trials"] != trials:
            mice = sorted(set(trials) | set(manifests[other]["trials"]))
            differ = [m for m in mice if trials.get(m) != manifests[other]["trials"].get(m)]
            raise PredictionError(
                f"{predictions_dir(workdir, other, split)}: predicts other trials than "
                f"{first} (mice {differ}); predict both with the same folds and data")
    roots = {m["data_root"] for m in manifests.values()}
    if not data_root and len(roots) > 1:
        raise PredictionError(f"the experiments predicted different data roots "
                              f"{sorted(roots)}; pass --data_root")
    dataset = SensoriumDataset.open(data_root or roots.pop())
    strides = {m["anchor_stride"] for m in manifests.values()}
    stride = strides.pop() if len(strides) == 1 else 0  # 0: mixed strides
    name = blend_name(names)
    directory = predictions_dir(workdir, name, split)
    (directory / MANIFEST).unlink(missing_ok=True)
    scorer = report.SplitScorer(dataset, split) if report.is_scored(dataset, split) else None
    for mouse_name, mouse_trials in trials.items():
        mouse = dataset.mouse(mouse_name)
        for trial in mouse_trials:
            arrays = [np.load(predictions_dir(workdir, e, split) / mouse_name / f"{trial}.npy",
                              allow_pickle=False) for e in names]
            if any(a.shape != arrays[0].shape for a in arrays):
                raise PredictionError(f"{mouse_name} trial {trial}: the experiments' arrays "
                                      f"differ in shape {[a.shape for a in arrays]}")
            mean = np.mean(np.stack(arrays).astype(np.float64), axis=0).astype(np.float32)
            write_trial(directory, mouse_name, trial, mean)
            if scorer is not None:
                scorer.add(mouse, trial, {stride: mean}, main=stride)
    manifest = {"format": MANIFEST_FORMAT, "experiment": name, "split": split,
                "experiments": names, "data_root": str(dataset.root), "anchor_stride": stride,
                "folds": [], "trials": trials}
    print(f"{name}: mean of {len(names)} experiments' {split} predictions -> {directory}")
    return finish(dataset, name, split, directory, manifest, scorer, workdir)
