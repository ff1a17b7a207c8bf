"""`python -m dwise_jax.predict --split SPLIT [--experiment A,B] [--blend_only]`: predictions,
submission, report.

As the original, every fold model's EMA weights predict every trial of the split with windows at
every anchor, mean-blended frame by frame, and the folds are averaged; with no `--experiment`
every experiment of the workdir, with several also their mean, the experiment `a,b`.
Splits, outputs, scores and anchor strides: docs/prediction.md."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from dwise_jax import checkpoint, cli, experiment, fatal, preview, report, sharding
from dwise_jax import forward as fwd
from dwise_jax.data import eval_windows, folds, windows
from dwise_jax.data.sensorium import Mouse, SensoriumDataset
from dwise_jax.experiment import PredictionError

DEFAULT_SWEEP = (1, 4, 8, 16, 30)


@dataclass
class FoldModel:
    """One fold's eval-mode EMA model, split for jitted forwards, its state on the device(s)."""

    fold: int
    directory: Path
    spec: checkpoint.ModelSpec
    step: int
    graphdef: Any
    state: Any

    @classmethod
    def of(cls, model: nnx.Module, mesh, fold: int = 0, directory: Path = Path("."),
           spec: checkpoint.ModelSpec | None = None, step: int = 0) -> FoldModel:
        """Wraps an eval-mode DwiseNeuro; its state is replicated over the mesh."""
        graphdef, state = nnx.split(model)
        spec = spec or checkpoint.ModelSpec(
            constructor={"readout_outputs": list(model.readout_outputs)},
            mice=[f"readout_{i}" for i in range(len(model.readouts))], source="in memory")
        return cls(fold, directory, spec, step, graphdef, sharding.replicate(state, mesh))

    def readout_index(self, mouse: Mouse) -> int:
        where = self.directory / checkpoint.MODEL_SPEC_FILE
        return experiment.readout_index(self.spec, mouse, where)


def load_fold_models(folders: dict[int, Path], mesh) -> list[FoldModel]:
    loaded = {k: experiment.load_fold(directory, k) for k, directory in folders.items()}
    return [FoldModel.of(model, mesh, k, folders[k], spec, step)
            for k, (model, spec, step) in loaded.items()]


def forward(model: FoldModel, frames, traces, readout_index: int):
    """(B, 16, N) float32 predictions of a batch of windows (on the mesh, or host arrays) by one
    readout: one program for every mouse (dwise_jax/forward.py), sliced to the mouse's N."""
    mouse = jax.device_put(np.full(np.shape(frames)[0], readout_index, np.int32),
                           getattr(frames, "sharding", None))
    out = fwd.jitted(model.graphdef, (model.state,), frames, traces, mouse)
    return out[..., :model.spec.num_neurons[readout_index]]


def blend_trials(model: FoldModel, mouse: Mouse, trials: list[int], strides: tuple[int, ...],
                 batch_size: int, mesh, progress: tqdm | None = None,
                 ) -> dict[int, eval_windows.WindowBlender]:
    """One fold model's blended predictions of a mouse's trials, a blender per anchor stride,
    from one pass over the union of the strides' windows."""
    index = model.readout_index(mouse)
    lengths = {t: int(mouse.lengths[t]) for t in trials}
    blenders = {s: eval_windows.WindowBlender(lengths, mouse.num_neurons, stride=s)
                for s in strides}

    def blend(outputs, batch):
        if jax.process_count() > 1:  # every process blends the whole global batch
            outputs = multihost_utils.process_allgather(outputs, tiled=True)
            batch = multihost_utils.process_allgather(batch, tiled=True)
        outputs = np.asarray(outputs)  # waits for this batch only; the next one is queued
        for blender in blenders.values():
            blender.add(outputs, batch)
        if progress is not None:
            progress.update(int(np.sum(batch["valid"])))

    pending = None  # each process reads its own rows of every batch
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
    """(mouse, indexes of the `models` that predict them, trial ids) of the split: test tiers by
    every fold; `folds`: each fold's labeled trials by that fold's model only."""
    plan = []
    for mouse in dataset.mice:
        if split == "folds":
            plan += [(mouse, (i,), trials) for i, model in enumerate(models)
                     if (trials := folds.labeled_trials(mouse, {model.fold}))]
        elif mouse.submitted and (trials := [int(t) for t in mouse.trial_ids(split)]):
            plan.append((mouse, tuple(range(len(models))), trials))
    if not plan:
        what = (f"labeled trials in folds {[m.fold for m in models]}" if split == "folds"
                else f"{split} trials of the submitted mice")
        raise PredictionError(f"{dataset.root}: has no {what}")
    for mouse, model_ids, _ in plan:  # fail before any compute
        for i in model_ids:
            models[i].readout_index(mouse)
    return plan


def predict_split(workdir: str | Path, name: str, split: str, *, data_root: str | None = None,
                  fold_ids: list[int] | None = None, anchor_stride: int = 1,
                  batch_size: int = 32, stride_sweep: tuple[int, ...] = DEFAULT_SWEEP) -> dict:
    """Predicts a split with every fold of experiment `name`; writes the arrays, submission and
    report. Returns `experiment.finish`'s dict (other processes than 0: no scores, no report)."""
    experiment.check_split(split)
    for s in (anchor_stride, *stride_sweep):
        if not 1 <= s <= windows.BEHIND:
            raise PredictionError(f"anchor strides must be in 1..{windows.BEHIND}, got {s}")
    mesh = sharding.make_mesh()
    if batch_size % mesh.size:
        raise PredictionError(f"batch size {batch_size} must be a multiple of the "
                              f"{mesh.size} devices")
    folders = experiment.fold_folders(workdir, name, fold_ids)
    dataset = SensoriumDataset.open(experiment.resolve_data_root(folders, data_root))
    models = load_fold_models(folders, mesh)
    plan = trial_plan(dataset, split, models)
    main = sharding.is_main_process()  # the one process that prints and writes
    directory, scorer = experiment.start(dataset, workdir, name, split) if main else (None, None)
    strides = (anchor_stride,)
    if report.is_scored(dataset, split) and anchor_stride == 1:  # from the same windows
        strides += tuple(s for s in stride_sweep if s != 1)
    total = sum(len(eval_windows.prediction_windows(mouse, trials, anchor_stride)) * len(ids)
                for mouse, ids, trials in plan)
    progress = None
    if main:
        print(f"{name}: predicting {split} with folds {[m.fold for m in models]} "
              f"({total} windows, anchor stride {anchor_stride}, {mesh.size} device(s))")
        params = preview.num_params(models[0].state.filter(nnx.Param))
        print(f"{name}: {preview.devices_text()}; {params:,} parameters per fold model; "
              f"batch {batch_size}; the time is measured on the first batches", flush=True)
        progress = preview.EstimatingBar(total=total, desc=split, label=f"{name} {split}",
                                         mininterval=1.0, dynamic_ncols=True)
    written: dict[str, list[int]] = {}
    for mouse, model_ids, trials in plan:
        for start in range(0, len(trials), experiment.CHUNK_TRIALS):
            chunk = trials[start:start + experiment.CHUNK_TRIALS]
            sums = {}  # {(stride, trial): the folds' sum}
            for i in model_ids:
                blenders = blend_trials(models[i], mouse, chunk, strides, batch_size, mesh,
                                        progress)
                for s, blender in blenders.items():
                    for t in chunk:
                        sums[s, t] = sums.get((s, t), 0.0) + blender.result(t).astype(np.float64)
            for t in chunk:
                written.setdefault(mouse.name, []).append(t)
                blends = {s: (sums[s, t] / len(model_ids)).astype(np.float32) for s in strides}
                if main:
                    experiment.write_trial(directory, mouse.name, t, blends[anchor_stride])
                if scorer is not None:
                    scorer.add(mouse, t, blends, main=anchor_stride)
    if progress is not None:
        progress.close()
    return experiment.finish(dataset, workdir, split, scorer, {
        "experiment": name, "anchor_stride": anchor_stride,
        "folds": [{"fold": m.fold, "step": m.step, "source": m.spec.source,
                   "directory": str(m.directory)} for m in models],
        "trials": {mouse: sorted(ts) for mouse, ts in written.items()}}, main=main)


def predict_and_blend(workdir: str | Path, experiments: list[str] | None, split: str, *,
                      blend_only: bool = False, **options) -> dict:
    """Predicts `split` with each experiment (None: every one of the workdir) and, with several,
    writes their mean (the winning submission's recipe); `blend_only`: only that mean, of
    predictions already written. Returns the last result written."""
    experiment.check_split(split)
    names = sorted(set(experiments)) if experiments else experiment.experiments_in(workdir)
    if blend_only and len(names) < 2:
        raise PredictionError(f"--blend_only needs two or more experiments, got {names}")
    results = [] if blend_only else [predict_split(workdir, e, split, **options) for e in names]
    if len(names) == 1 or not sharding.is_main_process():
        return results[0] if results else {}
    return experiment.blend_experiments(workdir, names, split, data_root=options.get("data_root"))


ERRORS = experiment.USER_ERRORS  # the user's to fix: one `error:` line, exit 1


def define_flags(fv: flags.FlagValues) -> None:
    for name, default, text in (
            ("split", None, f"One of {', '.join(experiment.SPLITS)}."),
            ("workdir", "workdir", "Work folder holding <experiment>/fold_<k>."),
            ("data_root", None, "Dataset root (default: the data_root of the folds' "
             "config.json).")):
        flags.DEFINE_string(name, default, text, flag_values=fv)
    for name, default, text in (
            ("experiment", None, "Experiment name(s) (default: every experiment of the "
             "workdir); with several, their mean is written too."),
            ("folds", None, "Folds to use (default: every fold found)."),
            ("stride_sweep", list(map(str, DEFAULT_SWEEP)), "Strides whose correlation scored "
             "splits also report (blended from the stride-1 windows); '' for none.")):
        flags.DEFINE_list(name, default, text, flag_values=fv)
    flags.DEFINE_integer("anchor_stride", 1, "1 = every anchor, as the original; S > 1 runs "
                         "~2/S of the windows.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "Windows per forward pass (all devices together).",
                         flag_values=fv)
    flags.DEFINE_bool("blend_only", False, "Average the experiments' predictions already "
                      "written instead of predicting.", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
    if args:
        raise cli.UsageError(f"unexpected arguments: {args}")
    if not fv.split:
        raise cli.UsageError(f"--split is required ({', '.join(experiment.SPLITS)})")
    try:
        fold_ids = [int(k) for k in fv.folds] if fv.folds else None
        sweep = tuple(int(s) for s in fv.stride_sweep if s.strip())
    except ValueError as e:
        raise cli.UsageError(f"--folds and --stride_sweep take integers ({e})") from None
    sharding.initialize_distributed()  # before any other JAX call (several processes)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
    try:
        predict_and_blend(fv.workdir, fv.experiment or None, fv.split, blend_only=fv.blend_only,
                          data_root=fv.data_root, fold_ids=fold_ids,
                          anchor_stride=fv.anchor_stride, batch_size=fv.batch_size,
                          stride_sweep=sweep)
    except Exception as e:  # disk full, a dead peer process: one line, exit 1
        fatal.exit_if_fatal(e, str(fv.workdir))
        raise
    return 0


if __name__ == "__main__":
    cli.main(__doc__, define_flags, run, errors=ERRORS)
