"""Distillation (docs/original.md#distillation): the 64% / 36% weight split, the loss against a
NumPy reference, a frozen eval-mode teacher in the train step, and the clear errors of a missing or
mismatched teacher; then a tiny stage one and distillation from it, end to end."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import model_kwargs, stream_config
from flax import nnx

from dwise_jax import checkpoint, experiment, fold_run, losses, predict, train_step
from dwise_jax import config as config_lib
from dwise_jax.data import pipeline
from dwise_jax.data.sensorium import SensoriumDataset
from dwise_jax.models.dwiseneuro import DwiseNeuro
from dwise_jax.train import train_and_evaluate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_MODEL = dict(core_features=(4, 8), spatial_strides=(4, 2), se_reduce_ratio=2,
                  cortex_features=(16, 32))
TINY = {
    "model.core_features": (4, 8), "model.spatial_strides": (4, 2),
    "model.se_reduce_ratio": 2, "model.cortex_features": (16, 32),
    "data.batch_size": 4, "data.val_batch_size": 16, "data.train_epoch_size": 12,
    "data.num_workers": 0, "optim.warmup_epochs": 1, "optim.cosine_epochs": 1,
    "log.every_steps": 1, "log.tensorboard": False, "log.plot": False,
}


def test_batch_of_32_over_10_mice_gives_64_and_36_percent():
    mouse = np.arange(32) % 10
    weights = losses.distillation_weights(jnp.asarray(np.eye(10)[mouse]), 0.36)
    weights = np.asarray(weights, np.float64)
    # By hand: 32 labels of weight 1; 320 - 32 = 288 missing pairs share
    # 0.36 / 0.64 * 32 = 18, i.e. 0.0625 each; the total is 50.
    own = np.eye(10, dtype=bool)[mouse]
    assert np.all(weights[own] == 1.0)
    np.testing.assert_allclose(weights[~own], 0.0625, rtol=1e-6)
    total = weights.sum()
    assert total == pytest.approx(50.0)
    assert weights[own].sum() / total == pytest.approx(0.64)
    assert weights[~own].sum() / total == pytest.approx(0.36)


def test_distillation_loss_equals_numpy_reference():
    rng = np.random.default_rng(0)
    counts, batch, time = (5, 9, 3), 6, 4
    mouse = np.array([0, 2, 1, 2, 2, 0])
    preds = [rng.uniform(0.01, 3, size=(batch, time, n)).astype(np.float32) for n in counts]
    teacher = [rng.uniform(0.01, 3, size=(batch, time, n)).astype(np.float32) for n in counts]
    targets = np.zeros((batch, time, max(counts)), np.float32)
    for b, m in enumerate(mouse):
        targets[b, :, : counts[m]] = rng.uniform(0, 2, size=(time, counts[m]))
    got = losses.distillation_loss(preds, jnp.asarray(targets), jnp.asarray(mouse), teacher, 0.36)
    # The original's formula, written out: w_d = r / (1 - r) * B / #missing, then normalised.
    w_d = 0.36 / 0.64 * batch / (batch * 3 - batch)
    total, expected = batch + w_d * (batch * 3 - batch), 0.0
    for m, n in enumerate(counts):
        for b in range(batch):
            own = mouse[b] == m
            y = targets[b, :, :n] if own else teacher[m][b]
            nll = np.sum(preds[m][b] - y * np.log(preds[m][b] + 1e-8), dtype=np.float64)
            expected += (1.0 if own else w_d) / total * nll
    assert float(got) == pytest.approx(expected, rel=1e-5)


def _leaves(tree):
    return [np.array(x) for x in jax.tree.leaves(tree)]


def test_train_step_uses_a_frozen_eval_mode_teacher(sim_root):
    dataset = SensoriumDataset.open(sim_root)
    with pipeline.TrainStream(
            dataset, stream_config(seed=1, batch_size=4, train_epoch_size=12), fold=0) as stream:
        batches = [next(stream), next(stream)]
    # The teacher has dropout: in train mode its predictions would be random.
    teacher = DwiseNeuro(**model_kwargs(dataset.num_neurons, **TINY_MODEL, expansion_ratio=3),
                         rngs=nnx.Rngs(params=7, dropout=8))
    # The student sees the video's rows only, the teacher the whole canvas: the step must build
    # the rows the teacher needs (the hand-computed loss below feeds both the whole canvas).
    student = DwiseNeuro(**model_kwargs(dataset.num_neurons, **TINY_MODEL, expansion_ratio=2,
                                        drop_rate=0.0, drop_path_rate=0.0, canvas_rows=36),
                         rngs=nnx.Rngs(params=0, dropout=1))
    trainer = train_step.Trainer(student, optax.sgd(1e-2), ema_decay=0.9, teacher=teacher,
                                 distill_ratio=0.36)
    assert trainer.distills and trainer.canvas_rows == 64
    before = _leaves(trainer.teacher_weights)
    state = trainer.init_state()
    student_before = _leaves(state["params"])
    assert set(state) == {"step", "params", "batch_stats", "opt_state", "ema"}
    train = jax.jit(trainer.train_step, donate_argnums=0)
    with pytest.raises(ValueError, match="teacher_weights"):
        jax.jit(trainer.train_step)(trainer.init_state(), batches[0])

    # The first step's loss, computed by hand from the teacher in eval mode.
    teacher.eval()
    student.train()
    expected = nnx.jit(lambda teacher, student, batch: losses.distillation_loss(
        student(x := pipeline.device_inputs(batch)), batch["targets"], batch["mouse"],
        teacher(x), 0.36))(teacher, student, batches[0])
    for batch in batches:
        state, metrics = train(state, batch, trainer.teacher_weights)
        if batch is batches[0]:
            assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    for a, b in zip(before, _leaves(trainer.teacher_weights), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b)
               for a, b in zip(student_before, _leaves(state["params"]), strict=True))


def _config(path, root, **extra):
    return config_lib.load_config_file(str(CONFIGS / path),
                                       {**TINY, "data_root": str(root), **extra})


def test_missing_teacher_is_a_clear_error_before_training(sim_root, tmp_path):
    config = _config("distillation.py", sim_root)
    teacher_dir = tmp_path / "true_batch_001" / "fold_0"
    with pytest.raises(fold_run.TrainingError, match=f"{teacher_dir}: no teacher checkpoint"):
        train_and_evaluate(config, tmp_path, folds=[0])
    assert not (tmp_path / "distillation_001").exists()


def test_teacher_of_other_mice_is_a_clear_error(sim_root, tmp_path):
    dataset = SensoriumDataset.open(sim_root)
    teacher_dir = checkpoint.fold_dir(tmp_path, "true_batch_001", 0)
    counts = [n + 1 for n in dataset.num_neurons]
    checkpoint.write_model_spec(teacher_dir, checkpoint.ModelSpec(
        constructor={"readout_outputs": counts}, mice=dataset.names, source="trained"))
    checkpoint.save(teacher_dir, 3, {"ema": {"w": np.zeros(2, np.float32)}})
    with pytest.raises(fold_run.TrainingError, match=f"{teacher_dir}: the teacher was trained "
                                                     "on other mice or neuron counts"):
        train_and_evaluate(_config("distillation.py", sim_root), tmp_path, folds=[0])
    assert not (tmp_path / "distillation_001").exists()


def test_stage_one_then_distillation(sim_root, tmp_path):
    stage_one = _config("true_batch.py", sim_root, **{"model.expansion_ratio": 3})
    train_and_evaluate(stage_one, tmp_path, folds=[0])
    teacher_dir = checkpoint.fold_dir(tmp_path, "true_batch_001", 0)
    _, before = checkpoint.restore(teacher_dir, ("ema",))
    files = {p: p.stat().st_mtime_ns for p in teacher_dir.rglob("*") if p.is_file()}

    distill = _config("distillation.py", sim_root, **{"model.expansion_ratio": 2})
    score = train_and_evaluate(distill, tmp_path, folds=[0])[0]
    assert np.isfinite(score)
    student_dir = checkpoint.fold_dir(tmp_path, "distillation_001", 0)
    spec = checkpoint.read_model_spec(student_dir)
    assert spec.constructor["expansion_ratio"] == 2
    assert spec.extra["teacher"]["directory"] == str(teacher_dir)
    assert checkpoint.latest_step(student_dir) == 6
    # The teacher's checkpoint is untouched.
    _, after = checkpoint.restore(teacher_dir, ("ema",))
    for a, b in zip(_leaves(before), _leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    assert files == {p: p.stat().st_mtime_ns for p in teacher_dir.rglob("*") if p.is_file()}

    # Out-of-fold predictions of both experiments, then their ensemble (the original's order).
    results = {e: predict.predict_split(tmp_path, e, "folds", anchor_stride=8, batch_size=16,
                                        stride_sweep=())
               for e in ("true_batch_001", "distillation_001")}
    ensembled = experiment.blend_experiments(tmp_path, list(results), "folds")
    name = "distillation_001,true_batch_001"
    trials = results["true_batch_001"]["manifest"]["trials"]
    assert trials and ensembled["manifest"]["trials"] == trials
    for mouse, ids in trials.items():
        for t in ids:
            arrays = [np.load(experiment.predictions_dir(tmp_path, e, "folds") / mouse / f"{t}.npy")
                      for e in (*results, name)]
            np.testing.assert_allclose(arrays[2], (arrays[0] + arrays[1]) / 2, rtol=1e-6)
    for result in (*results.values(), ensembled):
        scores = result["scores"]
        assert np.isfinite(scores.strides[scores.main].neuron_mean)
        assert Path(result["report"]).is_file()
