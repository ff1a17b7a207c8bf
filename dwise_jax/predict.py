"""`python -m dwise_jax.predict --split SPLIT [--experiment A,B]`: predictions, submission, report.

With no `--experiment`, every experiment of the workdir (each folder with trained fold_<k>
folders) is predicted, and with several their mean is written too (dwise_jax/ensemble.py), as the
winning submission was made: each experiment's folds averaged, then the experiments averaged.

As the original (docs/original.md#prediction): every fold model of the experiment (its EMA weights,
trained here or converted from the original's .pth) predicts every trial of the split with sliding
windows at every anchor (stride 1, as the original), batched on the device(s); the overlapping
windows are mean-blended frame by frame, the folds averaged, and each trial written as float32
(neurons, length) to

    <workdir>/predictions/<experiment>/<split>/<mouse>/<trial>.npy
    <workdir>/predictions/<experiment>/<split>/manifest.json      written last: folds, trials

Splits: the four test tiers (the submitted mice only, and the competition's parquet file beside
the arrays) and `folds`: out of fold, where fold k's model predicts the labeled trials of fold k
(of every mouse) and the competition correlation is printed and reported under
`<workdir>/reports/<experiment>/folds/`. On a simulated dataset the test splits are scored too,
against the responses the simulator keeps aside, next to its noise ceiling.

`--anchor_stride S` runs about 2/S of the windows (every frame stays covered). On scored splits
with stride 1 the report also gives the correlation at the strides of `--stride_sweep`, blended
from the same windows (no extra model time).
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from dwise_jax import atomic, checkpoint, disk_full, preview, report, sharding, submission
from dwise_jax.data import eval_windows, folds, pipeline, windows
from dwise_jax.data.sensorium import TEST_TIERS, DatasetError, Mouse, SensoriumDataset

SPLITS = (*TEST_TIERS, "folds")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dwise_jax.predictions/1"
DEFAULT_SWEEP = (1, 4, 8, 16, 30)
CHUNK_TRIALS = 8  # trials blended at a time: bounds host memory (real trials: ~19 MB each)


class PredictionError(RuntimeError):
    """Prediction cannot run: missing folds or predictions, unknown split, mismatched model."""


USER_ERRORS = (PredictionError, DatasetError, checkpoint.CheckpointError)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise PredictionError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")


def predictions_dir(workdir: str | Path, experiment: str, split: str) -> Path:
    """`<workdir>/predictions/<experiment>/<split>`."""
    return Path(workdir) / "predictions" / experiment / split


def predict_command(experiment: str, split: str, workdir: str | Path) -> str:
    return f"python -m dwise_jax.predict --experiment {experiment} --split {split} " \
           f"--workdir {workdir}"


# --------------------------------------------------------------------------- fold models


@dataclass
class FoldModel:
    """One fold's EMA model, split for jitted forwards, its state on the device(s)."""

    fold: int
    directory: Path
    spec: checkpoint.ModelSpec
    step: int
    graphdef: Any  # the whole model
    state: Any
    readout_graphdefs: list[Any]  # readout i's state is state["readouts"][i]

    @classmethod
    def of(cls, model: nnx.Module, mesh, fold: int = 0, directory: Path = Path("."),
           spec: checkpoint.ModelSpec | None = None, step: int = 0) -> FoldModel:
        """Wraps an eval-mode DwiseNeuro; its state is replicated over the mesh."""
        graphdef, state = nnx.split(model)
        readouts = [nnx.split(r)[0] for r in model.readouts]
        spec = spec or checkpoint.ModelSpec(
            constructor={"readout_outputs": list(model.readout_outputs)},
            mice=[f"readout_{i}" for i in range(len(readouts))], source="in memory")
        return cls(fold, directory, spec, step, graphdef, sharding.replicate(state, mesh),
                   readouts)

    def readout_index(self, mouse: Mouse) -> int:
        """The readout of `mouse`, checked against the dataset's neuron count."""
        path = self.directory / checkpoint.MODEL_SPEC_FILE
        if mouse.name not in self.spec.mice:
            raise PredictionError(f"{path}: has no readout for mouse {mouse.name} of "
                                  f"{mouse.path.parent}; its readouts are {self.spec.mice}")
        index = self.spec.mice.index(mouse.name)
        if self.spec.num_neurons[index] != mouse.num_neurons:
            raise PredictionError(
                f"{path}: readout {index} ({mouse.name}) has {self.spec.num_neurons[index]} "
                f"neurons but {mouse.path / 'meta/neurons/unit_ids.npy'} lists "
                f"{mouse.num_neurons}; the checkpoint does not fit this dataset")
        return index


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


def _training_steps(directory: Path) -> int | None:
    """Steps of a finished training run, from the fold's config.json (None if converted)."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    per_epoch = config["data"]["train_epoch_size"] // config["data"]["batch_size"]
    return (config["optim"]["warmup_epochs"] + config["optim"]["cosine_epochs"]) * per_epoch


def load_fold_models(folders: dict[int, Path], mesh) -> list[FoldModel]:
    """Loads each fold's EMA weights (float32, eval mode), replicated over the mesh."""
    models = []
    for k, directory in folders.items():
        model, spec, step = checkpoint.load_ema_model(directory)
        total = _training_steps(directory)
        if total is not None and step < total:
            print(f"warning: fold {k} checkpoint is at step {step} of {total}: its training "
                  "has not finished", file=sys.stderr)
        models.append(FoldModel.of(model, mesh, k, directory, spec, step))
    return models


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


# --------------------------------------------------------------------------- windows


# Core and cortex compile once for all mice; each readout (its own N) is a small program.
@functools.partial(jax.jit, static_argnums=0)
def _features(graphdef, state, frames, traces):
    """(B, 16, 36, 64) frames, (B, 16, 4) traces -> (B, 16, cortex features)."""
    x = pipeline.device_inputs({"frames": frames, "traces": traces})
    return nnx.merge(graphdef, state).features(x)


@functools.partial(jax.jit, static_argnums=0)
def _readout(graphdef, state, features):
    """(B, 16, cortex features) -> (B, 16, N) float32, one readout."""
    return nnx.merge(graphdef, state)(features)


def forward(model: FoldModel, frames, traces, readout_index: int):
    """`model(inputs, readout_index)` of a prediction batch: (B, 16, N) float32."""
    features = _features(model.graphdef, model.state, frames, traces)
    return _readout(model.readout_graphdefs[readout_index],
                    model.state["readouts"][readout_index], features)


def blend_trials(model: FoldModel, mouse: Mouse, trials: list[int], strides: tuple[int, ...],
                 batch_size: int, mesh, progress: tqdm | None = None,
                 ) -> dict[int, eval_windows.WindowBlender]:
    """One fold model's blended predictions of a mouse's trials, for each anchor stride.

    The model runs once over the union of the strides' windows, in batches of `batch_size`
    sharded over the mesh; each stride's blender takes its own windows from them.
    """
    index = model.readout_index(mouse)
    lengths = {t: int(mouse.lengths[t]) for t in trials}
    blenders = {s: eval_windows.WindowBlender(lengths, mouse.num_neurons, stride=s)
                for s in strides}
    pending = None

    def blend(outputs, batch):
        if jax.process_count() > 1:  # every process blends the whole global batch
            outputs = multihost_utils.process_allgather(outputs, tiled=True)
            batch = multihost_utils.process_allgather(batch, tiled=True)
        outputs = np.asarray(outputs)  # waits for this batch only; the next one is queued
        for blender in blenders.values():
            blender.add(outputs, batch)
        if progress is not None:
            progress.update(int(np.sum(batch["valid"])))

    # Each process reads its own rows of every batch.
    for batch in eval_windows.prediction_batches(mouse, trials, batch_size, stride=strides,
                                                 shard_index=jax.process_index(),
                                                 shard_count=jax.process_count()):
        placed = sharding.put_batch({"frames": batch["frames"], "traces": batch["traces"]}, mesh)
        outputs = forward(model, placed["frames"], placed["traces"], index)
        if pending is not None:
            blend(*pending)
        pending = (outputs, {k: batch[k] for k in ("trial", "anchor", "valid")})
    if pending is not None:
        blend(*pending)
    return blenders


def trial_plan(dataset: SensoriumDataset, split: str, models: list[FoldModel],
               ) -> list[tuple[Mouse, tuple[int, ...], list[int]]]:
    """(mouse, indexes into `models` that predict them, trial ids) groups of the split.

    Test splits: every trial of that tier of the submitted mice, by every fold. `folds`: the
    labeled trials of each fold that has a model, by that fold's model only.
    """
    plan = []
    for mouse in dataset.mice:
        if split == "folds":
            for i, model in enumerate(models):
                trials = folds.labeled_trials(mouse, {model.fold})
                if trials:
                    plan.append((mouse, (i,), trials))
        elif mouse.submitted:
            trials = [int(t) for t in mouse.trial_ids(split)]
            if trials:
                plan.append((mouse, tuple(range(len(models))), trials))
    if not plan:
        what = (f"labeled trials in folds {[m.fold for m in models]}" if split == "folds"
                else f"{split} trials of the submitted mice")
        raise PredictionError(f"{dataset.root}: has no {what}")
    for mouse, model_ids, _ in plan:  # fail before any compute
        for i in model_ids:
            models[i].readout_index(mouse)
    return plan


# --------------------------------------------------------------------------- outputs


def write_trial(directory: Path, mouse: str, trial: int, prediction: np.ndarray) -> None:
    with atomic.atomic_path(directory / mouse / f"{trial}.npy", suffix=".npy") as tmp:
        np.save(tmp, np.asarray(prediction, np.float32))


def read_manifest(directory: Path, command: str) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise PredictionError(f"{path}: missing (no complete predictions there); make them "
                              f"with `{command}`")
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
    """Writes the manifest (marking the arrays complete), the submission and the report."""
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


# --------------------------------------------------------------------------- the split


def predict_split(workdir: str | Path, experiment: str, split: str, *,
                  data_root: str | None = None, fold_ids: list[int] | None = None,
                  anchor_stride: int = 1, batch_size: int = 32,
                  stride_sweep: tuple[int, ...] = DEFAULT_SWEEP) -> dict:
    """Predicts a split with every fold of an experiment; writes arrays, submission, report.

    Returns:
      {"directory", "manifest", "submission" (path or None), and on scored splits "scores"
      (see report.SplitScorer.summary) and "report" (the Markdown file)}.
    """
    check_split(split)
    for s in (anchor_stride, *stride_sweep):
        if not 1 <= s <= windows.BEHIND:
            raise PredictionError(f"anchor strides must be in 1..{windows.BEHIND}, got {s}")
    mesh = sharding.make_mesh()
    if batch_size % mesh.size:
        raise PredictionError(f"batch size {batch_size} must be a multiple of the "
                              f"{mesh.size} devices")
    folders = fold_folders(workdir, experiment, fold_ids)
    dataset = SensoriumDataset.open(resolve_data_root(folders, data_root))
    models = load_fold_models(folders, mesh)
    plan = trial_plan(dataset, split, models)
    scorer = report.SplitScorer(dataset, split) if report.is_scored(dataset, split) else None
    strides = (anchor_stride,)
    if scorer is not None and anchor_stride == 1 and stride_sweep:
        strides += tuple(s for s in stride_sweep if s != 1)  # blended from the same windows
    directory = predictions_dir(workdir, experiment, split)
    main = sharding.is_main_process()  # the one process that prints and writes
    if main:
        (directory / MANIFEST).unlink(missing_ok=True)  # until this run completes

    total = sum(len(eval_windows.prediction_windows(mouse, trials, anchor_stride)) * len(ids)
                for mouse, ids, trials in plan)
    if main:
        print(f"{experiment}: predicting {split} with folds {[m.fold for m in models]} "
              f"({total} windows, anchor stride {anchor_stride}, {mesh.size} device(s))")
        params = preview.num_params(models[0].state.filter(nnx.Param))
        print(f"{experiment}: {preview.devices_text()}; {params:,} parameters per fold model; "
              f"batch {batch_size}; the time is measured on the first batches", flush=True)
    progress = preview.EstimatingBar(total=total, desc=split, label=f"{experiment} {split}",
                                     mininterval=1.0, dynamic_ncols=True) if main else None
    written: dict[str, list[int]] = {}
    for mouse, model_ids, trials in plan:
        for start in range(0, len(trials), CHUNK_TRIALS):
            chunk = trials[start:start + CHUNK_TRIALS]
            sums = {s: {t: 0.0 for t in chunk} for s in strides}
            for i in model_ids:
                blenders = blend_trials(models[i], mouse, chunk, strides, batch_size, mesh,
                                        progress)
                for s, blender in blenders.items():
                    for t in chunk:
                        sums[s][t] = sums[s][t] + blender.result(t).astype(np.float64)
            for t in chunk:
                blends = {s: (sums[s][t] / len(model_ids)).astype(np.float32) for s in strides}
                written.setdefault(mouse.name, []).append(t)
                if not main:
                    continue
                write_trial(directory, mouse.name, t, blends[anchor_stride])
                if scorer is not None:
                    scorer.add(mouse, t, blends, main=anchor_stride)
    if progress is not None:
        progress.close()
    manifest = {
        "format": MANIFEST_FORMAT, "experiment": experiment, "split": split,
        "data_root": str(dataset.root), "anchor_stride": anchor_stride,
        "folds": [{"fold": m.fold, "step": m.step, "source": m.spec.source,
                   "directory": str(m.directory)} for m in models],
        "trials": {name: sorted(ts) for name, ts in written.items()},
    }
    if not main:
        return {"directory": directory, "manifest": manifest, "submission": None}
    return finish(dataset, experiment, split, directory, manifest, scorer, workdir)


def experiments_in(workdir: str | Path) -> list[str]:
    """The experiments of a workdir: its folders with at least one fold_<k> that has a
    checkpoint, sorted."""
    root = Path(workdir)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and any(
        checkpoint.latest_step(checkpoint.fold_dir(root, p.name, k)) is not None
        for k in range(folds.NUM_FOLDS))) if root.is_dir() else []
    if not found:
        raise PredictionError(f"{root}: holds no trained experiment (<experiment>/fold_<k> with "
                              "a checkpoint); train one with `python -m dwise_jax.train --config "
                              "...` or pass --workdir")
    return found


def predict_and_blend(workdir: str | Path, experiments: list[str] | None, split: str,
                      **options) -> dict:
    """Predicts `split` with each experiment (each one's folds blended) and, with several, the
    mean of the experiments (dwise_jax/ensemble.py), as the winning submission was made.
    `experiments` None: every experiment of the workdir. Returns the last result written."""
    from dwise_jax import ensemble  # it builds on this module

    check_split(split)
    names = sorted(set(experiments)) if experiments else experiments_in(workdir)
    results = [predict_split(workdir, e, split, **options) for e in names]
    if len(names) == 1 or not sharding.is_main_process():
        return results[0]
    return ensemble.ensemble_split(workdir, names, split, data_root=options.get("data_root"))


# --------------------------------------------------------------------------- command line

def define_flags() -> None:
    """The command line's flags (defined only when run as a program, so that importing this
    module next to another entry point defines nothing)."""
    flags.DEFINE_string("experiment", None,
                        "Experiment name(s), comma-separated (default: every experiment of the "
                        "workdir); with several, their mean is written too.")
    flags.DEFINE_string("split", None, f"One of {', '.join(SPLITS)}.")
    flags.DEFINE_string("workdir", "workdir", "Work folder holding <experiment>/fold_<k>.")
    flags.DEFINE_string("data_root", None,
                        "Dataset root (default: the data_root of the folds' config.json).")
    flags.DEFINE_string("folds", None, "Comma-separated folds (default: every fold found).")
    flags.DEFINE_integer("anchor_stride", 1,
                         "1 = every anchor, as the original; S > 1 runs ~2/S of the windows.")
    flags.DEFINE_integer("batch_size", 32, "Windows per forward pass (all devices together).")
    flags.DEFINE_string("stride_sweep", ",".join(map(str, DEFAULT_SWEEP)),
                        "Strides whose correlation scored splits also report (blended from the "
                        "stride-1 windows); '' for none.")


def main(argv: list[str]) -> int:
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not f.split:
        raise app.UsageError(f"--split is required ({', '.join(SPLITS)})")
    sharding.initialize_distributed()  # before any other JAX call (several processes)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
    try:
        fold_ids = [int(k) for k in f.folds.split(",")] if f.folds else None
        sweep = tuple(int(s) for s in f.stride_sweep.split(",") if s.strip())
    except ValueError as e:
        raise app.UsageError(
            f"--folds and --stride_sweep take comma-separated integers ({e})") from None
    try:
        experiments = [e for e in (f.experiment or "").split(",") if e.strip()] or None
        predict_and_blend(f.workdir, experiments, f.split, data_root=f.data_root,
                          fold_ids=fold_ids, anchor_stride=f.anchor_stride,
                          batch_size=f.batch_size, stride_sweep=sweep)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if (full := disk_full.find(e)) is not None:
            disk_full.exit_with(full, str(f.workdir))
        if sharding.peer_failure(e):  # several processes: one died, so the collective failed
            disk_full.exit_with_line(sharding.peer_failure_line(e, str(f.workdir)))
        raise
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
