"""Fold folders: model.json round trip, Orbax save/restore of named items, clear errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import best_step, model_kwargs

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


def _trees(count):
    rng = np.random.default_rng(0)
    return [{"params": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
             "stats": {"mean": rng.normal(size=(4,)).astype(np.float32)}} for _ in range(count)]


def test_save_restore_items_and_keep_latest(tmp_path):
    trees = _trees(3)
    assert checkpoint.latest_step(tmp_path) is None
    for step, tree in zip((5, 9, 12), trees, strict=True):
        checkpoint.save(tmp_path, step, {"ema": tree, "extra": {"step": np.int64(step)}})
    assert checkpoint.latest_step(tmp_path) == 12
    # Only the newest two steps stay on disk (the second is the fallback of a bad newest).
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == [
        "12", "9"]
    step, items = checkpoint.restore(tmp_path)
    assert step == 12 and set(items) == {"ema"}
    np.testing.assert_array_equal(items["ema"]["params"]["w"], trees[2]["params"]["w"])
    np.testing.assert_array_equal(items["ema"]["stats"]["mean"], trees[2]["stats"]["mean"])
    assert checkpoint.verify(tmp_path, 12) is None


def test_one_manager_keeps_the_latest_two_and_the_best_step(tmp_path):
    """Orbax's preservation policy, one manager held over many saves: the best validated step
    stays whatever its age; unvalidated steps (a stop mid-epoch) are kept only while latest."""
    corrs = {1: 0.10, 2: 0.50, 3: 0.20, 4: None, 5: 0.30, 6: float("nan"), 7: 0.25}
    kept = {}
    with checkpoint.FoldCheckpoints(tmp_path) as checkpoints:
        for step, corr in corrs.items():
            checkpoints.save(step, {"ema": {"w": np.full(2, step, np.float32)}}, corr)
            kept[step] = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                                if p.name.isdigit())
    # Latest two, plus the best validated step so far (by hand from `corrs`).
    assert kept[1] == [1] and kept[2] == [1, 2] and kept[3] == [2, 3]
    assert kept[4] == [2, 3, 4] and kept[5] == [2, 4, 5] and kept[7] == [2, 6, 7]
    assert best_step(tmp_path) == 2 and checkpoint.latest_step(tmp_path) == 7
    assert checkpoint.all_steps(tmp_path) == [7, 6, 2]
    _, items = checkpoint.restore(tmp_path, step=2)
    np.testing.assert_array_equal(items["ema"]["w"], [2, 2])


def test_relative_fold_folder(tmp_path, monkeypatch):
    """The commands' default workdir is the relative "workdir"; Orbax needs absolute paths."""
    monkeypatch.chdir(tmp_path)
    tree = _trees(1)[0]
    checkpoint.save("workdir/demo/fold_0", 3, {"ema": tree})
    step, items = checkpoint.restore("workdir/demo/fold_0")
    assert step == 3 and checkpoint.latest_step("workdir/demo/fold_0") == 3
    np.testing.assert_array_equal(items["ema"]["params"]["w"], tree["params"]["w"])
    assert (tmp_path / "workdir/demo/fold_0/checkpoints/3/manifest.json").is_file()


def _largest_file(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != "manifest.json"]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_newest_step_is_reported_and_the_previous_one_used(tmp_path, capsys, damage):
    trees = _trees(2)
    checkpoint.save(tmp_path, 5, {"ema": trees[0]})
    checkpoint.save(tmp_path, 9, {"ema": trees[1]})
    victim = _largest_file(tmp_path / "checkpoints" / "9")
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        victim.unlink()
    problem = checkpoint.verify(tmp_path, 9)
    assert problem is not None and victim.name in problem
    step, items = checkpoint.restore(tmp_path)
    assert step == 5
    np.testing.assert_array_equal(items["ema"]["params"]["w"], trees[0]["params"]["w"])
    err = capsys.readouterr().err
    assert "skipping a bad checkpoint" in err and victim.name in err and "using step 5" in err
    # Asked for by number, the bad step is an error, not a silent substitute.
    with pytest.raises(checkpoint.CheckpointError, match=victim.name):
        checkpoint.restore(tmp_path, step=9)


def test_no_readable_step_is_a_clear_error(tmp_path):
    checkpoint.save(tmp_path, 3, {"ema": _trees(1)[0]})
    _largest_file(tmp_path / "checkpoints" / "3").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
        checkpoint.restore(tmp_path)


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


@pytest.mark.parametrize("layout", ["train_state", "merged_before_2026_12_06"])
def test_load_ema_model_reads_the_train_states_layout_and_the_older_merged_one(tmp_path, layout):
    """The EMA item is {"params", "batch_stats"}, as the train state holds it; checkpoints written
    before 2026-12-06 hold one merged tree and still load (and resume), to the same weights."""
    from flax import nnx

    from dwise_jax.models.dwiseneuro import DwiseNeuro

    arch = {"readout_outputs": [3, 4], "core_features": [8], "spatial_strides": [2],
            "expansion_ratio": 2, "se_reduce_ratio": 4, "cortex_features": [16, 16]}
    model = DwiseNeuro(**model_kwargs(**arch), rngs=nnx.Rngs(7))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stats = jax.tree.map(lambda a: a + 1.0, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    ema = ({"params": params, "batch_stats": stats} if layout == "train_state"
           else nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat))))
    if layout != "train_state":  # the merged tree with the same shifted statistics
        ema = jax.tree.map(lambda a: a, ema)
        for path, value in _leaves(stats):
            _set(ema, path, value)
    checkpoint.save(tmp_path, 4, {"ema": jax.tree.map(np.asarray, ema)})
    checkpoint.write_model_spec(tmp_path, checkpoint.ModelSpec(arch, ["a", "b"], "test"))
    loaded, _, step = checkpoint.load_ema_model(tmp_path)
    assert step == 4
    for path, value in _leaves(params):
        np.testing.assert_array_equal(_get(nnx.to_pure_dict(nnx.state(loaded, nnx.Param)), path),
                                      value)
    for path, value in _leaves(stats):
        np.testing.assert_array_equal(
            _get(nnx.to_pure_dict(nnx.state(loaded, nnx.BatchStat)), path), value)
    # A resumed run reads the EMA the same way, into the train state's abstract layout.
    want = {"params": params, "batch_stats": stats}
    step, ema = checkpoint.read_ema(tmp_path, jax.eval_shape(lambda t: t, want))
    assert step == 4 and all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(ema))
    jax.tree.map(np.testing.assert_array_equal, ema, want)


def _leaves(tree, path=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, (*path, k))
    else:
        yield path, np.asarray(tree)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return np.asarray(tree)


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value
