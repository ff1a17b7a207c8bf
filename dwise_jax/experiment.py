"""A trained experiment on disk: its fold folders (`<workdir>/<experiment>/fold_<k>/`), their
models, and its predictions (`<workdir>/predictions/<experiment>/<split>/`, complete once
manifest.json is written; docs/prediction.md). A blend of experiments is the experiment `a,b`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dwise_jax import atomic, checkpoint, report, submission
from dwise_jax.data import folds
from dwise_jax.data.sensorium import NPY_LOCK, TEST_TIERS, DatasetError, Mouse, SensoriumDataset

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


def fold_folders(workdir: str | Path, experiment: str,
                 fold_ids: list[int] | None = None) -> dict[int, Path]:
    """{fold: folder} of the requested folds, or of every `fold_<k>` folder found."""
    if fold_ids is None:
        fold_ids = [k for k in range(folds.NUM_FOLDS)
                    if checkpoint.fold_dir(workdir, experiment, k).is_dir()]
        if not fold_ids:
            raise PredictionError(
                f"{Path(workdir) / experiment}: no fold folders (fold_0 .. fold_6); train them "
                "with `python -m dwise_jax.train --config ...` or convert the original's "
                "weights with `python -m dwise_jax.convert`")
    out = {}
    for k in fold_ids:
        if not 0 <= k < folds.NUM_FOLDS:
            raise PredictionError(f"folds must be in 0..{folds.NUM_FOLDS - 1}, got {k}")
        out[k] = checkpoint.fold_dir(workdir, experiment, k)
        if checkpoint.latest_step(out[k]) is None:
            raise PredictionError(f"{out[k] / checkpoint.CHECKPOINTS_DIR}: fold {k} of "
                                  f"{experiment} has no checkpoint")
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
    """(EMA model in eval mode, spec, step) of a fold; warns if its training (the step count
    in model.json; converted weights have none) has not finished."""
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


def predictions_dir(workdir: str | Path, experiment: str, split: str) -> Path:
    return Path(workdir) / "predictions" / experiment / split


def write_trial(directory: Path, mouse: str, trial: int, prediction: np.ndarray) -> None:
    with atomic.atomic_path(directory / mouse / f"{trial}.npy", suffix=".npy") as tmp:
        np.save(tmp, np.asarray(prediction, np.float32))


def read_trial(directory: Path, mouse: str, trial: int) -> np.ndarray:
    with NPY_LOCK:
        return np.load(directory / mouse / f"{trial}.npy", allow_pickle=False)


def start(dataset: SensoriumDataset, workdir: str | Path, experiment: str,
          split: str) -> tuple[Path, report.SplitScorer | None]:
    """The predictions' folder, its manifest removed until the run completes, and the split's
    scorer (None where the split is not scored)."""
    directory = predictions_dir(workdir, experiment, split)
    (directory / MANIFEST).unlink(missing_ok=True)
    scored = report.is_scored(dataset, split)
    return directory, report.SplitScorer(dataset, split) if scored else None


def write_submission(dataset: SensoriumDataset, split: str, directory: Path,
                     trials: dict[str, list[int]]) -> Path | None:
    """The split's competition file from the written arrays: submitted mice, one at a time."""
    mice = [m for m in dataset.mice if m.submitted and trials.get(m.name)]
    if split not in submission.SPLIT_FILES or not mice:
        return None

    def tables():
        for mouse in mice:
            std, chosen = mouse.response_std(), sorted(trials[mouse.name])
            for i in range(0, len(chosen), CHUNK_TRIALS):
                preds = {t: read_trial(directory, mouse.name, t) for t in chosen[i:][:CHUNK_TRIALS]}
                yield submission.mouse_table(mouse.name, mouse.unit_ids, std, preds)

    return submission.write_tables(submission.split_file(directory, split), tables())


def finish(dataset: SensoriumDataset, workdir: str | Path, split: str,
           scorer: report.SplitScorer | None, manifest: dict, main: bool = True) -> dict:
    """Completes `manifest` and (on the main process) writes it, the submission and the report;
    returns {"directory", "manifest", "submission" (path or None), scored: "scores", "report"}."""
    name = manifest["experiment"]
    manifest = {"format": MANIFEST_FORMAT, "split": split, "data_root": str(dataset.root),
                **manifest}
    directory = predictions_dir(workdir, name, split)
    result = {"directory": directory, "manifest": manifest, "submission": None}
    if not main:
        return result
    atomic.write_json(directory / MANIFEST, manifest)
    result["submission"] = write_submission(dataset, split, directory, manifest["trials"])
    if result["submission"] is not None:
        print(f"submission: {result['submission']}")
    if scorer is not None:
        result["scores"] = scorer.summary()
        report.print_scores(result["scores"])
        out = Path(workdir) / "reports" / name / split
        result["report"] = report.write_report(out, result["scores"], scorer.examples, manifest)
        print(f"report: {result['report']}")
    return result


def blend_experiments(workdir: str | Path, experiments: list[str], split: str, *,
                      data_root: str | None = None) -> dict:
    """The mean of the experiments' (fold-blended) predictions of `split`, written as the
    experiment `a,b` (sorted names joined by commas, as the original) with its submission and
    report; returns `finish`'s result."""
    check_split(split)
    names = sorted(set(experiments))
    if len(names) < 2:
        raise PredictionError(f"a blend needs two or more experiments, got {names}")
    manifests = {}
    for e in names:
        path = predictions_dir(workdir, e, split) / MANIFEST
        if not path.is_file():
            raise PredictionError(
                f"{path}: missing (no complete predictions there); make them with `python -m "
                f"dwise_jax.predict --experiment {e} --split {split} --workdir {workdir}`")
        manifests[e] = json.loads(path.read_text())
    trials = manifests[names[0]]["trials"]
    for other in names[1:]:
        theirs = manifests[other]["trials"]
        if theirs != trials:
            differ = [m for m in sorted({*trials, *theirs}) if trials.get(m) != theirs.get(m)]
            raise PredictionError(
                f"{predictions_dir(workdir, other, split)}: predicts other trials than "
                f"{names[0]} (mice {differ}); predict both with the same folds and data")
    roots = {m["data_root"] for m in manifests.values()}
    if not data_root and len(roots) > 1:
        raise PredictionError(f"the experiments predicted different data roots "
                              f"{sorted(roots)}; pass --data_root")
    dataset = SensoriumDataset.open(data_root or roots.pop())
    strides = {m["anchor_stride"] for m in manifests.values()}
    stride = strides.pop() if len(strides) == 1 else 0  # 0: mixed strides
    name = ",".join(names)
    directory, scorer = start(dataset, workdir, name, split)
    for mouse_name, mouse_trials in trials.items():
        mouse = dataset.mouse(mouse_name)
        for trial in mouse_trials:
            arrays = [read_trial(predictions_dir(workdir, e, split), mouse_name, trial)
                      for e in names]
            if any(a.shape != arrays[0].shape for a in arrays):
                raise PredictionError(f"{mouse_name} trial {trial}: the experiments' arrays "
                                      f"differ in shape {[a.shape for a in arrays]}")
            mean = np.mean(np.stack(arrays).astype(np.float64), axis=0).astype(np.float32)
            write_trial(directory, mouse_name, trial, mean)
            if scorer is not None:
                scorer.add(mouse, trial, {stride: mean}, main=stride)
    print(f"{name}: mean of {len(names)} experiments' {split} predictions -> {directory}")
    return finish(dataset, workdir, split, scorer, {
        "experiment": name, "experiments": names, "anchor_stride": stride, "folds": [],
        "trials": trials})
