"""Fold folders: model.json round trip, Orbax save/restore of named items, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dwise_jax import atomic, checkpoint


def _spec(mice=("mouse_a", "mouse_b")) -> checkpoint.ModelSpec:
    return checkpoint.ModelSpec(
        constructor={"readout_outputs": [7, 11], "expansion_ratio": 3},
        mice=list(mice), source="test")


def test_fold_dir_layout(tmp_path):
    assert checkpoint.fold_dir(tmp_path, "exp", 3) == tmp_path / "exp" / "fold_3"


def test_model_spec_round_trip(tmp_path):
    path = checkpoint.write_model_spec(tmp_path, _spec())
    assert json.loads(path.read_text())["format"] == checkpoint.MODEL_SPEC_FORMAT
    spec = checkpoint.read_model_spec(tmp_path)
    assert spec == _spec()
    assert spec.num_neurons == [7, 11]


def test_model_spec_mice_must_match_readouts():
    with pytest.raises(checkpoint.CheckpointError, match="2 mice"):
        checkpoint.ModelSpec(constructor={"readout_outputs": [1]}, mice=["a", "b"], source="x")


def test_model_spec_missing_and_malformed(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="model.json: missing"):
        checkpoint.read_model_spec(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="not valid JSON"):
        checkpoint.read_model_spec(tmp_path)


def test_save_restore_items_and_keep_latest(tmp_path):
    rng = np.random.default_rng(0)
    trees = [{"params": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
              "stats": {"mean": rng.normal(size=(4,)).astype(np.float32)}} for _ in range(2)]
    assert checkpoint.latest_step(tmp_path) is None
    checkpoint.save(tmp_path, 5, {"ema": trees[0], "extra": {"step": np.int64(5)}})
    checkpoint.save(tmp_path, 9, {"ema": trees[1], "extra": {"step": np.int64(9)}})
    assert checkpoint.latest_step(tmp_path) == 9
    # max_to_keep=1: only the newest step stays on disk.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["9"]
    step, items = checkpoint.restore(tmp_path)
    assert step == 9 and set(items) == {"ema"}
    np.testing.assert_array_equal(items["ema"]["params"]["w"], trees[1]["params"]["w"])
    np.testing.assert_array_equal(items["ema"]["stats"]["mean"], trees[1]["stats"]["mean"])


def test_restore_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint found"):
        checkpoint.restore(tmp_path)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
