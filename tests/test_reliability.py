"""Reliability (issue 9): training killed with SIGKILL at random points resumes to the same final
state bit for bit; checkpoint writes killed midway leave the last complete step readable; a
non-finite loss stops training and keeps the last good checkpoint; bfloat16 keeps the loss and
the softplus in float32.

`DWISE_JAX_KILLS=20 pytest tests/test_reliability.py` kills more often (default 3);
`DWISE_JAX_KILL_SEED` draws other kill points (default 0, so CI is reproducible).

The training runs are the real command line, at the tiny size of tests/test_train.py, sharing
one JAX compilation cache: only the first run compiles, the restarts load the programs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    FOLD,
    HANG_TIMEOUT_S,
    REFERENCE_EXTRA,
    REPO,
    TINY,
    Child,
    assert_bit_identical,
    call_command,
    command_env,
    detach,
    link_copy,
    model_kwargs,
    records,
    stream_config,
    train_args,
    train_command,
)

from dwise_jax import checkpoint
from dwise_jax.logbook import Logbook

KILLS = int(os.environ.get("DWISE_JAX_KILLS", "3"))
KILL_SEED = int(os.environ.get("DWISE_JAX_KILL_SEED", "0"))
STEPS_PER_EPOCH = TINY["data.train_epoch_size"] // TINY["data.batch_size"]
TOTAL_STEPS = STEPS_PER_EPOCH * (TINY["optim.warmup_epochs"] + TINY["optim.cosine_epochs"])
WRITER = REPO / "tests" / "scripts" / "checkpoint_writer.py"


@pytest.fixture(scope="module")
def plain_root(sim_root, tmp_path_factory) -> Path:
    return link_copy(sim_root, tmp_path_factory.mktemp("plain") / "root")


@pytest.fixture(scope="module")
def train_env(tmp_path_factory) -> dict[str, str]:
    """The command line's environment: its CPU settings already set (so it does not re-exec),
    the test run's JAX compilation cache (conftest.py) inherited."""
    return command_env()


def train_losses(fold: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(fold / "metrics.jsonl") if r["kind"] == "train"}


# ----------------------------------------------------------------------------- crashes
def test_random_sigkills_resume_to_the_same_state_bit_for_bit(plain_root, train_env, tmp_path,
                                                              reference_fold, capsys,
                                                              monkeypatch):
    # One metrics.jsonl record per step (REFERENCE_EXTRA): the step counter. The uninterrupted
    # reference (conftest.reference_fold) and the final restart run in process
    # (conftest.call_command); the killed runs are command lines.
    extra = REFERENCE_EXTRA
    args = lambda workdir: train_args(plain_root, workdir, *extra)

    workdir = tmp_path / "killed"
    fold = checkpoint.fold_dir(workdir, "demo", FOLD)
    metrics = fold / "metrics.jsonl"
    rng = np.random.default_rng(KILL_SEED)
    # Kill points spread over the run (steps 1 .. TOTAL_STEPS - 2, in order, so the run gets
    # on), each a random time after that step's record: inside a step, a validation, a
    # checkpoint write or the start of the next step.
    targets = np.sort(rng.integers(1, TOTAL_STEPS - 1, size=KILLS))
    delays = rng.uniform(0.0, 0.6, size=KILLS)
    kills = []
    for target, delay in zip(targets, delays, strict=True):
        resume = checkpoint.latest_step(fold)
        # Without a checkpoint the run appends to the records a killed run left; with one it
        # first drops every record past the checkpoint (then prints "resuming from step").
        skip = len(metrics.read_text().splitlines()) if resume is None and metrics.exists() else 0
        goal = max(int(target), (resume or 0) + 1)
        child = Child(train_command(plain_root, workdir, *extra), train_env,
                      tmp_path / f"stderr_{len(kills)}.txt")
        deadline = time.monotonic() + HANG_TIMEOUT_S
        while True:
            assert child.alive(), (f"run {len(kills)} ended before its kill (goal step {goal}): "
                                   f"{(tmp_path / f'stderr_{len(kills)}.txt').read_text()[-3000:]}")
            started = resume is None or any("resuming from step" in x for x in child.lines)
            if started and any(r["kind"] == "train" and r["step"] >= goal
                               for r in records(metrics, skip)):
                break
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        time.sleep(delay)
        assert child.alive(), f"the run finished before kill {len(kills) + 1}: {kills}"
        child.kill()
        kills.append({"resumed_from": resume, "after_step": goal, "delay_s": round(delay, 2),
                      "wall_s": round(time.monotonic() - deadline + HANG_TIMEOUT_S, 1)})

    capsys.readouterr()
    resumable = checkpoint.latest_step(fold) is not None
    status, last = call_command("train", args(workdir), monkeypatch), capsys.readouterr()
    assert status == 0, last.err[-3000:]
    assert len(kills) == KILLS
    if resumable:
        assert "resuming from step" in last.out, kills

    items = ("state", "ema", "loader")
    a_step, a = checkpoint.restore(reference_fold, items)
    b_step, b = checkpoint.restore(fold, items)
    assert a_step == b_step == TOTAL_STEPS
    assert_bit_identical(a, b)  # parameters, BatchNorm statistics, optimizer state, EMA, loader
    # Every step's training loss, as logged by whichever run made it, equals the straight run's.
    assert train_losses(fold) == train_losses(reference_fold), kills


def _load_writer():
    spec = importlib.util.spec_from_file_location("checkpoint_writer", WRITER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sigkill_during_checkpoint_writes_keeps_the_last_complete_step(tmp_path):
    writer = _load_writer()
    rng = np.random.default_rng(KILL_SEED + 1)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    steps = tmp_path / "checkpoints"
    next_step, interrupted = 0, 0
    for i in range(KILLS):
        child = Child([sys.executable, str(WRITER), str(tmp_path), str(next_step)], env,
                      tmp_path / f"stderr_{i}.txt")
        wanted = int(rng.integers(1, 3))  # complete steps first, then a kill inside the next
        deadline = time.monotonic() + HANG_TIMEOUT_S
        while not (len(child.lines) >= wanted and steps.is_dir()
                   and any(not p.name.isdigit() for p in steps.iterdir())):
            assert child.alive(), (tmp_path / f"stderr_{i}.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.2))
        if i == KILLS - 1 and not interrupted:
            child.stop_inside_write(steps)  # the last chance: make sure one kill lands in a write
        child.kill()
        saved = max(int(x.split()[1]) for x in child.lines)
        unfinished = [p.name for p in steps.iterdir() if not p.name.isdigit()]
        step, items = checkpoint.restore(tmp_path, ("ema", "meta"))
        # The newest step that completed: the last one reported, or one finished just before
        # the kill and not yet reported.
        assert step in (saved, saved + 1), (step, saved, unfinished)
        assert checkpoint.verify(tmp_path, step) is None
        assert int(items["meta"]["step"]) == step
        for name, value in writer.expected_tree(step).items():
            np.testing.assert_array_equal(items["ema"][name], value, err_msg=name)
        interrupted += bool(unfinished) or not (steps / str(step) / "manifest.json").exists()
        next_step = step + 1  # as training does: go on from the newest complete step
    assert interrupted >= 1, "no kill landed inside a checkpoint write"


# ----------------------------------------------------------------------------- numerical faults
@pytest.mark.parametrize("every, first_steps, detected", [
    (2, 3, 4),
    # Logged every 4 steps, 3 steps per epoch: step 5 goes bad, the epoch end at step 6 checks
    # every loss since the last check before it saves, and names step 5.
    (4, 4, 5),
], ids=["detected_at_a_logging_step", "detected_before_an_epoch_save"])
def test_nonfinite_loss_stops_training_and_keeps_the_last_good_checkpoint(
        plain_root, tmp_path, capsys, monkeypatch, every, first_steps, detected):
    # In process (conftest.call_command): the command line's status and its one error line.
    from dwise_jax.data import folds
    from dwise_jax.data.sensorium import SensoriumDataset

    root = link_copy(plain_root, tmp_path / "root")
    args = train_args(root, tmp_path / "work", f"--config.log.every_steps={every}")
    assert call_command("train", [*args, f"--max_steps={first_steps}"], monkeypatch) == 0
    capsys.readouterr()
    fold = checkpoint.fold_dir(tmp_path / "work", "demo", FOLD)
    _, good = checkpoint.restore(fold, ("state", "ema"))

    # Responses that are finite (they pass every data check) but so large that the Poisson
    # loss overflows: every training trial of every mouse, the validation fold untouched. The
    # statistics record them (max.npy), so the value check (test_value_check.py) lets them in.
    for mouse in SensoriumDataset.open(root).mice:
        stat = detach(mouse.path / "meta" / "statistics" / "responses" / "all" / "max.npy")
        np.save(stat, np.full_like(np.load(stat), 3e38))
        trial_folds = folds.trial_folds(mouse)
        for trial in range(mouse.num_trials):
            if mouse.is_labeled(trial) and trial_folds[trial] != FOLD:
                path = detach(mouse.path_of("responses", trial))
                responses = np.load(path)
                responses[:, : mouse.lengths[trial]] = 3e38
                np.save(path, responses)

    status, err = call_command("train", args, monkeypatch), capsys.readouterr().err
    assert status == 1, err[-3000:]
    assert "Traceback" not in err
    message = (rf"error: fold {FOLD}: loss is (nan|inf|-inf) at step {detected} \(batch mice "
               rf"\[[0-9, ]+\]\); the last good checkpoint is kept in {re.escape(str(fold))}\n")
    assert re.search(message, err), err[-3000:]
    assert checkpoint.latest_step(fold) == first_steps
    assert checkpoint.verify(fold, first_steps) is None
    step, kept = checkpoint.restore(fold, ("state", "ema"))
    assert step == first_steps
    assert_bit_identical(kept, good)
    assert not any(r.get("loss") is not None and not np.isfinite(r["loss"])
                   for r in records(fold / "metrics.jsonl"))


def test_bfloat16_keeps_the_loss_and_the_softplus_in_float32(sim_root):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dwise_jax import train_step
    from dwise_jax.data import pipeline
    from dwise_jax.data.sensorium import SensoriumDataset
    from dwise_jax.models.dwiseneuro import DwiseNeuro

    dataset = SensoriumDataset.open(sim_root)
    with pipeline.TrainStream(
            dataset, stream_config(batch_size=4, train_epoch_size=12), fold=0) as stream:
        batch = next(stream)
    model = DwiseNeuro(**model_kwargs(
        dataset.num_neurons, core_features=(8, 8, 16), spatial_strides=(2, 2, 2),
        expansion_ratio=2, se_reduce_ratio=4, cortex_features=(32, 64)),
        dtype=jnp.bfloat16, rngs=nnx.Rngs(params=0, dropout=1))
    trainer = train_step.Trainer(model, optax.sgd(1e-3), ema_decay=0.9)
    closed, (_, metrics) = jax.make_jaxpr(trainer.train_step, return_shape=True)(
        trainer.init_state(), batch)

    def equations(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        yield from equations(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        yield from equations(sub)

    def dtypes(eqn):
        return {str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype")}

    by_name: dict[str, list[set[str]]] = {}
    for eqn in equations(closed.jaxpr):
        by_name.setdefault(eqn.primitive.name, []).append(dtypes(eqn))
    # The network really computes in bfloat16 ...
    assert any("bfloat16" in d for d in by_name["dot_general"])
    # ... but the softplus (log1p(exp(-|x|)) + max) and the Poisson loss's log are float32.
    assert by_name["log1p"] and all(d == {"float32"} for d in by_name["log1p"])
    assert by_name["log"] and all(d == {"float32"} for d in by_name["log"])
    assert metrics["loss"].dtype == jnp.float32
    graphdef, state = nnx.split(model)
    outputs = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                             pipeline.device_inputs(batch))
    assert all(o.dtype == jnp.float32 for o in outputs)  # every readout's softplus output


def test_a_metrics_line_cut_by_a_crash_is_skipped(tmp_path, capsys):
    book = Logbook(tmp_path, tensorboard=False, plot=False)
    book.log(1, "train", loss=1.5)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "kind": "tr')  # the crash
    assert book.records() == [{"step": 1, "kind": "train", "loss": 1.5}]
    assert "metrics.jsonl:2: skipping an incomplete line" in capsys.readouterr().err
    book.log(2, "train", loss=2.5)  # starts on a line of its own
    assert [r["step"] for r in book.records()] == [1, 2]
    book.truncate_after(1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "kind": "train", "loss": 1.5}\n'
