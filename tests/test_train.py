"""Training end to end at tiny size: artifacts, resume of a finished fold and of an older
checkpoint layout, one step on 4 devices equal to one device, and the clear errors of the
command line. (Resume after SIGKILL: test_reliability; graceful stops: test_stop,
test_multiprocess.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CLI_TINY,
    DEMO,
    HANG_TIMEOUT_S,
    REPO,
    TINY,
    best_step,
    checkpoint_leaves,
    command_env,
    model_kwargs,
    run_module,
    stream_config,
)

from dwise_jax import checkpoint, fold_run
from dwise_jax import config as config_lib
from dwise_jax.train import train_and_evaluate


def _final_state(fold_dir: Path) -> dict:
    _, items = checkpoint.restore(fold_dir, ("state", "ema"))
    return items


def test_tiny_training_writes_everything(sim_root, tmp_path):
    config = config_lib.load_config_file(DEMO, {**TINY, "data_root": str(sim_root)})
    scores = train_and_evaluate(config, tmp_path, folds=[1])
    fold = checkpoint.fold_dir(tmp_path, "demo", 1)
    assert np.isfinite(scores[1])
    for name in ("config.json", "model.json", "metrics.jsonl", "curves.png"):
        assert (fold / name).is_file(), name
    assert checkpoint.latest_step(fold) == 9 and best_step(fold) is not None
    assert any((fold / "tensorboard").iterdir())
    records = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
    val_steps = [r["step"] for r in records if r["kind"] == "val"]
    # Validation before each fit (steps 0 and 3) and after every epoch (3, 6, 9); the start of
    # the cosine fit is the end of the warm-up epoch, validated once.
    assert val_steps == [0, 3, 6, 9]
    assert records[-1]["corr"] == pytest.approx(scores[1])
    # Prediction reads the EMA of the last epoch through model.json.
    model, spec, step = checkpoint.load_ema_model(fold)
    assert step == 9 and spec.mice == [p.name for p in sorted(sim_root.iterdir())
                                      if p.name.startswith("dynamic")]
    # The demo's core sees the video's rows only; the loaded model crops the same way.
    assert spec.constructor["canvas_rows"] == 36 and model.canvas_rows == 36
    # A finished fold resumes to nothing and reports the same score.
    assert train_and_evaluate(config, tmp_path, folds=[1])[1] == pytest.approx(scores[1])

    # A run saved with the EMA as one merged tree (the layout before 2026-12-06) resumes to
    # the same final state as the run above.
    old = tmp_path / "old"
    train_and_evaluate(config, old, folds=[1], max_steps=3)
    old_fold = checkpoint.fold_dir(old, "demo", 1)
    step, items = checkpoint.restore(old_fold, ("state", "ema", "loader"))
    shutil.rmtree(old_fold / "checkpoints")
    checkpoint.save(old_fold, step, {**items, "ema": _merge(items["ema"])})
    assert train_and_evaluate(config, old, folds=[1])[1] == scores[1]
    a, b = (dict(checkpoint_leaves(_final_state(f))) for f in (fold, old_fold))
    assert a.keys() == b.keys()
    for key, value in a.items():
        np.testing.assert_array_equal(value, b[key], err_msg=key)


def _merge(ema: dict) -> dict:
    """The older checkpoint layout: params and batch_stats merged into one tree."""
    def merge(x, y):
        return {k: merge(x[k], y[k]) if k in x and k in y else x.get(k, y.get(k))
                for k in x.keys() | y.keys()}
    return merge(ema["params"], ema["batch_stats"])


def test_refuses_another_architecture_or_config(sim_root, tmp_path):
    config = config_lib.load_config_file(DEMO, {**TINY, "data_root": str(sim_root)})
    fold = checkpoint.fold_dir(tmp_path, "demo", 0)
    spec = checkpoint.ModelSpec(constructor={"readout_outputs": [1, 2, 3]}, mice=["a", "b", "c"],
                                source="trained")
    checkpoint.write_model_spec(fold, spec)
    with pytest.raises(fold_run.TrainingError, match="another architecture"):
        train_and_evaluate(config, tmp_path, folds=[0])
    (fold / "model.json").unlink()
    (fold / "config.json").write_text(json.dumps({**config.to_dict(), "seed": 99}))
    with pytest.raises(fold_run.TrainingError, match="changed: seed"):
        train_and_evaluate(config, tmp_path, folds=[0])


def test_one_step_on_four_devices_equals_one_device(sim_root):
    env = command_env("--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "multidevice_step.py"),
                          str(sim_root)], capture_output=True, text=True, env=env,
                         timeout=HANG_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    one, four = result["results"]["1"], result["results"]["4"]
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert four["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    np.testing.assert_allclose(four["params"], one["params"], rtol=1e-5, atol=1e-6)


def test_profile_and_hlo_dump(sim_root, tmp_path):
    # A relative --workdir (like the default "workdir"), resolved against the working folder.
    out = run_module("dwise_jax.train", ["--config", DEMO, f"--data_root={sim_root}",
                                         "--workdir=.", "--folds=0", *CLI_TINY,
                                         "--profile_steps=1:2", "--dump_hlo", "--max_steps=2"],
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    fold = tmp_path / "demo" / "fold_0"
    assert "HloModule" in (fold / "train_step.hlo.txt").read_text()[:1000]
    traces = list((fold / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert checkpoint.latest_step(fold) == 2  # --max_steps stops with a checkpoint


def test_bfloat16_train_step_keeps_float32_params_and_loss(sim_root):
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
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = DwiseNeuro(**model_kwargs(
            dataset.num_neurons, core_features=(8, 8, 16), spatial_strides=(2, 2, 2),
            expansion_ratio=2, se_reduce_ratio=4, cortex_features=(32, 64), drop_rate=0.0,
            drop_path_rate=0.0), dtype=dtype, rngs=nnx.Rngs(params=0, dropout=1))
        trainer = train_step.Trainer(model, optax.sgd(1e-3), ema_decay=0.9)
        state, metrics = jax.jit(trainer.train_step)(trainer.init_state(), batch)
        assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state["params"]))
        losses[dtype] = float(metrics["loss"])
    assert losses[jnp.bfloat16] == pytest.approx(losses[jnp.float32], rel=0.05)
