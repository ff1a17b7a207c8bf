"""`train_fold`: one fold of one experiment, from set-up to the last epoch, resumable, in
sections in the order things happen; beside it `validate` (the original's val_corr with the
EMA weights) and the check that an existing fold folder fits the run."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dwise_jax import (
    atomic,
    checkpoint,
    fold_lock,
    optim,
    preview,
    readout_bias,
    sharding,
    stop,
    train_step,
)
from dwise_jax import config as config_lib
from dwise_jax.data import eval_windows, pipeline
from dwise_jax.data.sensorium import DatasetError, SensoriumDataset
from dwise_jax.logbook import Logbook
from dwise_jax.metrics import PearsonSums
from dwise_jax.models.dwiseneuro import DwiseNeuro


class TrainingError(RuntimeError):
    """Training cannot start or go on (incompatible fold folder, non-finite loss, ...)."""


USER_ERRORS = (TrainingError, DatasetError, checkpoint.CheckpointError, config_lib.ConfigError,
               fold_lock.FoldLockedError)
# Config fields that may change between a run and its restart (they do not change results).
_RESTART_FREE = ("workdir", "data_root", "folds", "log", "data.num_workers",
                 "data.prefetch_buffer_size")


def _check_fold_folder(directory: Path, config, spec: checkpoint.ModelSpec) -> None:
    """Refuses to train into a fold folder made by another experiment or architecture."""
    if (directory / checkpoint.MODEL_SPEC_FILE).exists():
        old = checkpoint.read_model_spec(directory)
        if old.constructor != spec.constructor or old.mice != spec.mice:
            raise TrainingError(
                f"{directory}: holds checkpoints of another architecture or mice "
                f"({checkpoint.MODEL_SPEC_FILE} differs); choose another workdir or experiment")
    config_file = directory / "config.json"
    if config_file.exists():
        old = _settings(json.loads(config_file.read_text()))
        new = _settings(json.loads(json.dumps(config.to_dict())))  # tuples as JSON lists
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            raise TrainingError(
                f"{config_file}: this fold was trained with another config (changed: "
                f"{', '.join(changed)}); choose another workdir or experiment name")


def _settings(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a config as JSON holds it, less the `_RESTART_FREE` fields."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if key not in _RESTART_FREE:
            out.update(_settings(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def validate(evaluate, weights, dataset: SensoriumDataset, fold: int, batch_size: int,
             mesh) -> dict[str, float]:
    """The original's val_corr (docs/original.md#training) and the validation loss, with the
    given (EMA) weights."""
    sums = [PearsonSums.zeros(n) for n in dataset.num_neurons]
    loss_sum, count = 0.0, 0
    # Each process reads and scores its own rows of every batch; the sums are then added up.
    for batch in eval_windows.validation_batches(dataset, fold, batch_size,
                                                 shard_index=jax.process_index(),
                                                 shard_count=jax.process_count()):
        out = evaluate(weights, sharding.put_batch(dict(batch), mesh))
        preds, losses = sharding.local_rows(out["preds"]), sharding.local_rows(out["loss"])
        for b in np.flatnonzero(batch["valid"]):
            m = int(batch["mouse"][b])
            n = dataset.num_neurons[m]
            sums[m] = sums[m] + PearsonSums.of(preds[b, :, :n], batch["targets"][b, :, :n])
            loss_sum += float(losses[b])
            count += 1
    if jax.process_count() > 1:
        fields = ("x", "y", "xx", "yy", "xy")
        total = sharding.sum_over_processes(
            {"n": np.array([s.n for s in sums]), "loss": np.float64(loss_sum),
             "count": np.int64(count),
             "sums": [{f: getattr(s, f) for f in fields} for s in sums]})
        sums = [PearsonSums(int(n), *(part[f] for f in fields))
                for n, part in zip(total["n"], total["sums"], strict=True)]
        loss_sum, count = float(total["loss"]), int(total["count"])
    if count == 0:
        raise TrainingError(f"fold {fold} has no validation windows in {dataset.root}")
    per_mouse = [float(np.mean(s.correlation())) for s in sums if s.n > 0]
    return {"corr": float(np.mean(per_mouse)), "loss": loss_sum / count}


@fold_lock.guard_training  # one process per fold folder, before anything is read there
def train_fold(config, workdir: Path, fold: int, *, profile_steps: tuple[int, int] | None = None,
               dump_hlo: bool = False, max_steps: int | None = None) -> float:
    """Trains fold `fold` (validation fold) and returns its final EMA validation correlation."""
    # Until this run's first step of the fold is done, a stop request ends the process at once.
    directory = checkpoint.fold_dir(workdir, config.experiment, fold)
    stop.fold_started(str(directory), on_exit=lambda: _drop_lock(directory))
    mesh = sharding.make_mesh()
    config_lib.validate(config, num_devices=mesh.size)
    is_main = jax.process_index() == 0
    # Data.
    dataset = SensoriumDataset.open(config.data_root)
    d, o = config.data, config.optim
    steps_per_epoch = d.train_epoch_size // d.batch_size
    warmup_steps = o.warmup_epochs * steps_per_epoch
    cosine_steps = o.cosine_epochs * steps_per_epoch
    total_steps = warmup_steps + cosine_steps
    shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
    # Model.
    kwargs = config_lib.model_kwargs(config, dataset.num_neurons)
    dtype = jnp.bfloat16 if config.model.compute_dtype == "bfloat16" else jnp.float32
    model = DwiseNeuro(**kwargs, dtype=dtype,
                       rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    if config.model.readout_bias_init == "response_mean":
        readout_bias.set_readout_biases(model, dataset, config.model.softplus_beta)
    extra = {"experiment": config.experiment, "fold": fold, "total_steps": total_steps}
    teacher = None
    if config.distill.enabled:  # before anything is written: a missing teacher stops here
        teacher, extra["teacher"] = load_teacher(config, workdir, fold, dataset, dtype)
    spec = checkpoint.ModelSpec(constructor=kwargs, mice=dataset.names, source="trained",
                                extra=extra)
    # Optimiser: warm-up then cosine, both per iteration (docs/original.md#training).
    schedule = optim.lr_schedule(optim.scaled_lr(o.base_lr, d.batch_size),
                                 optim.scaled_lr(o.min_lr, d.batch_size), warmup_steps,
                                 cosine_steps)
    trainer = train_step.Trainer(model, optim.adamw(schedule, o.weight_decay),
                                 ema_decay=o.ema_decay, iter_size=o.iter_size, seed=config.seed,
                                 teacher=teacher, distill_ratio=config.distill.ratio)
    state = trainer.init_state()
    del model, teacher
    replicated = sharding.replicated(mesh)
    train, evaluate = train_step.jit_steps(trainer, replicated, sharding.batch_sharding(mesh))
    # The frozen teacher's EMA weights: an argument of every train step, never updated. Moved
    # (donated), not copied: one copy of the teacher per device.
    step_args = ()
    if trainer.distills:
        step_args = (jax.device_put(trainer.teacher_weights, replicated, donate=True),)
        trainer.teacher_weights = None
    # Fold folder and restore.
    _check_fold_folder(directory, config, spec)
    logbook = Logbook(directory, enabled=is_main, tensorboard=config.log.tensorboard,
                      plot=config.log.plot)
    stream = pipeline.TrainStream(dataset, config, fold=fold, **shard)
    resume_step = checkpoint.latest_step(directory)
    checkpoints = checkpoint.FoldCheckpoints(directory)  # latest two steps and the best one
    if resume_step is not None:
        state, stream_state = _restore(directory, state)
        stream.set_state(stream_state)
        logbook.truncate_after(int(state["step"]))
        if is_main:
            print(f"fold {fold}: resuming from step {int(state['step'])} in {directory}")
    else:
        logbook.truncate_after(-1)  # records of an attempt killed before its first checkpoint
        if is_main:
            checkpoint.write_model_spec(directory, spec)
            atomic.write_json(directory / "config.json", config.to_dict())
    params = preview.num_params(state["params"])
    state = jax.device_put(state, replicated)
    # The epoch loop.
    last_step = total_steps if max_steps is None else min(total_steps, max_steps)
    step = int(state["step"])
    if is_main:
        for line in preview.train_lines(fold=fold, params=params, steps=last_step, done=step,
                                        epochs=o.warmup_epochs + o.cosine_epochs):
            print(line, flush=True)
    timed = []  # seconds of this run's first steps (the first one compiles)
    # (Filtered by step as well: in a multi-process run the others may read the file before
    # process 0 has truncated it.)
    vals = [(r["step"], r["corr"]) for r in logbook.records()
            if r["kind"] == "val" and r["step"] <= step]
    # The original validates before each fit too; at the start of the cosine fit that is the
    # end-of-epoch validation just done with the same weights, so it is not repeated.
    validated_at, score = vals[-1] if vals else (None, math.nan)
    if dump_hlo and is_main:
        with pipeline.TrainStream(dataset, config, fold=fold, **shard) as probe:
            first = sharding.put_batch(next(probe), mesh)
        hlo = train.lower(state, first, *step_args).compile().as_text()
        with atomic.atomic_path(directory / "train_step.hlo.txt") as tmp:
            tmp.write_text(hlo)
    timer, samples = time.perf_counter(), 0
    bar = tqdm(total=last_step, initial=step, desc=f"fold {fold}", unit="step",
               disable=not is_main, mininterval=1.0, dynamic_ncols=True)
    unchecked = []
    try:
        stopping = False
        while step < last_step and not stopping:
            if (step in (0, warmup_steps) and step % steps_per_epoch == 0
                    and validated_at != step):
                val = validate(evaluate, state["ema"], dataset, fold, d.val_batch_size, mesh)
                logbook.log(step, "val", **val)
                score, validated_at = val["corr"], step
            if profile_steps and step == profile_steps[0] and is_main:
                jax.profiler.start_trace(str(directory / "profile"))
            started = time.perf_counter()
            host_batch = next(stream)
            state, metrics = train(state, sharding.put_batch(host_batch, mesh), *step_args)
            step += 1
            if len(timed) < 3:  # wait for the first steps, to time them and to mark the first
                jax.block_until_ready(metrics)
                timed.append(time.perf_counter() - started)
                stop.step_done()  # stop requests are graceful from now on
                if is_main and (len(timed) == 3 or step == last_step):
                    bar.write(preview.step_time_line(
                        fold, timed[0], float(np.mean(timed[1:])) if timed[1:] else None,
                        last_step - step))
            # Every step's loss is checked before anything is logged or saved (read then, so
            # the steps still run asynchronously in between).
            unchecked.append((step, metrics["loss"], host_batch["mouse"]))
            samples += d.batch_size
            bar.update(1)
            if profile_steps and step == profile_steps[1] and is_main:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            stopping = _stop_agreed(step, config.log.every_steps)
            saving = step % steps_per_epoch == 0 or step == last_step or stopping
            if step % config.log.every_steps == 0 or saving:
                _check_losses(unchecked, fold, directory)
            if step % config.log.every_steps == 0 or step == last_step:
                loss, lr = float(metrics["loss"]), float(schedule(step - 1))
                rate = samples / (time.perf_counter() - timer)
                logbook.log(step, "train", loss=loss, lr=lr,
                            grad_norm=float(metrics["grad_norm"]), samples_per_s=rate)
                bar.set_postfix(epoch=f"{step / steps_per_epoch:.2f}", loss=f"{loss:.1f}",
                                lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
                timer, samples = time.perf_counter(), 0
            if step % steps_per_epoch == 0 or step == last_step:
                val = validate(evaluate, state["ema"], dataset, fold, d.val_batch_size, mesh)
                logbook.log(step, "val", **val)
                score, validated_at = val["corr"], step
                if is_main:
                    bar.write(f"fold {fold} step {step}: val_corr {val['corr']:.4f} "
                              f"val_loss {val['loss']:.2f}")
                _save(checkpoints, state, stream, step, val["corr"])
                logbook.plot()
        if stopping:  # saved above at an epoch's end or the last step, else here
            if step % steps_per_epoch != 0 and step != last_step:
                _save(checkpoints, state, stream, step, None)
            print(f"fold {fold}: stopped by request at step {step}; checkpoint saved")
    finally:
        stop.fold_ended()
        checkpoints.close()
        bar.close()
        stream.close()
        logbook.close()
    return score


def load_teacher(config, workdir: Path, fold: int, dataset: SensoriumDataset,
                 dtype) -> tuple[nnx.Module, dict[str, Any]]:
    """(teacher, its provenance for model.json): the eval-mode EMA model of the same fold of
    `distill.teacher_experiment`, built from its own model.json, computing in `dtype`; a
    TrainingError naming the folder when missing, unreadable, or for other mice or neurons."""
    directory = checkpoint.fold_dir(workdir, config.distill.teacher_experiment, fold)
    if config.distill.teacher_experiment == config.experiment:
        raise TrainingError(f"{directory}: distill.teacher_experiment is this experiment; "
                            "the teacher must be another experiment")
    if (not (directory / checkpoint.MODEL_SPEC_FILE).is_file()
            or checkpoint.latest_step(directory) is None):
        raise TrainingError(
            f"{directory}: no teacher checkpoint for distillation (distill.teacher_experiment="
            f"{config.distill.teacher_experiment!r}); train that experiment's fold {fold} "
            "into the same workdir first")
    try:
        spec = checkpoint.read_model_spec(directory)
    except checkpoint.CheckpointError as e:
        raise TrainingError(f"{directory}: cannot read the teacher ({e})") from None
    if spec.mice != list(dataset.names) or spec.num_neurons != list(dataset.num_neurons):
        raise TrainingError(
            f"{directory}: the teacher was trained on other mice or neuron counts "
            f"({dict(zip(spec.mice, spec.num_neurons, strict=True))}) than {dataset.root} "
            f"({dict(zip(dataset.names, dataset.num_neurons, strict=True))})")
    try:
        teacher, _, step = checkpoint.load_ema_model(directory, dtype)
    except checkpoint.CheckpointError as e:
        raise TrainingError(f"{directory}: cannot load the teacher ({e})") from None
    return teacher, {"directory": str(directory), "step": int(step),
                     "experiment": config.distill.teacher_experiment}


def _stop_agreed(step: int, every: int) -> bool:
    """Whether to stop after `step`: a stop request (dwise_jax/stop.py) to this process or, with
    several processes, to any of them, read by all at the same steps (every `every`), so that
    they stop and save together even when only one of them was signalled."""
    if jax.process_count() == 1:
        return stop.requested()
    if step % every:
        return False
    return bool(sharding.sum_over_processes(np.int32(stop.requested())) > 0)


def _drop_lock(directory: Path) -> None:
    """Removes this process's fold lock (before an immediate exit, which skips `finally`)."""
    path = directory / fold_lock.LOCK_NAME
    holder = fold_lock.read_holder(path)
    if holder is not None and holder.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def _check_losses(unchecked: list, fold: int, directory: Path) -> None:
    """Raises TrainingError at the first non-finite loss of `(step, loss, mice)` entries (before
    anything of that state is saved), naming the step and the batch's mice; empties the list."""
    for step, loss, mice in unchecked:
        if not math.isfinite(loss := float(loss)):
            raise TrainingError(
                f"fold {fold}: loss is {loss} at step {step} (batch mice "
                f"{sorted(set(np.asarray(mice).tolist()))}); the last good checkpoint is kept "
                f"in {directory}")
    unchecked.clear()


def _save(checkpoints: checkpoint.FoldCheckpoints, state, stream, step: int,
          val_corr: float | None) -> None:
    """The train state as it is (the EMA as its own item, what prediction reads) and the
    loader's position; `val_corr` ranks the step for the best-step policy."""
    host = jax.device_get(state)
    checkpoints.save(step, {
        "state": {k: v for k, v in host.items() if k != "ema"},
        "ema": host["ema"],
        "loader": {"state": pipeline.encode_state(stream.get_state())},
    }, val_corr)


def _restore(directory: Path, template) -> tuple[dict, dict]:
    """The train state and loader state of the newest readable step; the EMA read by
    `checkpoint.read_ema` (either EMA layout) from that same step."""
    abstract = jax.eval_shape(lambda t: t, template)
    step, items = checkpoint.restore(directory, ("state", "loader"), targets={
        "state": {k: v for k, v in abstract.items() if k != "ema"}})
    _, ema = checkpoint.read_ema(directory, abstract["ema"], step)
    return {**items["state"], "ema": ema}, pipeline.decode_state(items["loader"]["state"])
