"""The Grain streams: sampling, batch contents against direct computation and pipeline.npz
items 2, 3 and 7, CutMix, validation and prediction windows, blending, resume with workers and
errors raised in workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S, stream_config

from dwise_jax.data import eval_windows, folds, pipeline, synthetic, window_reader, windows
from dwise_jax.data.sensorium import DatasetError, SensoriumDataset

REPO = Path(__file__).resolve().parents[1]


def _cl(x: np.ndarray) -> np.ndarray:
    """(..., C, T, H, W) -> channels-last (..., T, H, W, C)."""
    return np.moveaxis(x, -4, -1)


@pytest.fixture(scope="module")
def sim(sim_root) -> SensoriumDataset:
    return SensoriumDataset.open(sim_root)


def _stream(root, fold=0, num_epochs=2, shard_index=0, shard_count=1, seed=3,
            **data) -> pipeline.TrainStream:
    # 3 mice x 8 samples = 24 per epoch, 6 batches of 4: per-mouse counts are exact.
    config = stream_config(seed=seed, **{"batch_size": 4, "train_epoch_size": 24, **data})
    return pipeline.TrainStream(root, config, fold=fold, num_epochs=num_epochs,
                                shard_index=shard_index, shard_count=shard_count)


def _take(stream: pipeline.TrainStream, n: int) -> list[dict[str, np.ndarray]]:
    # Copies: with workers the arrays live in shared memory that Grain frees with them.
    return [{k: np.array(v) for k, v in next(stream).items()} for _ in range(n)]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def reference(sim) -> list[dict[str, np.ndarray]]:
    """Both epochs of the 0-worker stream."""
    with _stream(sim) as stream:
        return _take(stream, 12)


# --------------------------------------------------------------------------- sampling


def test_each_mouse_gets_its_share_and_draws_stay_in_range(sim, reference):
    stream = _stream(sim)
    assert stream.steps_per_epoch == 6 and stream.num_neurons == 12
    for epoch in (0, 1):
        mice = np.concatenate([b["mouse"] for b in reference[6 * epoch: 6 * epoch + 6]])
        np.testing.assert_array_equal(np.bincount(mice, minlength=3), [8, 8, 8])
    samples = stream.samples
    for epoch in range(5):
        for position in range(samples.epoch_length):
            d = samples.draw(epoch, position)
            mouse = sim.mice[d.mouse]
            fold = folds.trial_folds(mouse)
            for trial, anchor in ((d.trial, d.anchor), (d.partner_trial, d.partner_anchor)):
                assert fold[trial] >= 0 and fold[trial] != 0
                assert 30 <= anchor <= mouse.lengths[trial] - 1
    # The batches follow the draws (row r of batch k is position 4 k + r of its epoch).
    rows = [samples.draw(0, p) for p in range(4)]
    np.testing.assert_array_equal(reference[0]["mouse"], [d.mouse for d in rows])
    np.testing.assert_array_equal(reference[0]["box"], [d.box for d in rows])


def test_streams_are_deterministic_and_epochs_differ(sim, reference):
    with _stream(sim) as stream:
        _assert_batches_equal(_take(stream, 12), reference)
    samples = _stream(sim).samples
    draws = [[samples.draw(e, p) for p in range(24)] for e in (0, 1)]
    assert [(d.mouse, d.trial, d.anchor) for d in draws[0]] != [
        (d.mouse, d.trial, d.anchor) for d in draws[1]]
    other = _stream(sim, seed=4).samples
    assert [other.draw(0, p).anchor for p in range(24)] != [d.anchor for d in draws[0]]


def test_cutmix_is_applied_with_probability_p(sim):
    for prob, low, high in ((0.5, 0.45, 0.55), (0.0, 0.0, 0.0), (1.0, 0.99, 1.0)):
        samples = _stream(sim, cutmix_prob=prob, train_epoch_size=1500).samples
        fractions = np.array([windows.box_fraction(samples.draw(0, p).box)
                              for p in range(samples.epoch_length)])
        applied = fractions > 0
        assert low <= applied.mean() <= high
        if applied.any():  # lambda ~ Beta(1, 1): mean area ~ 0.4 before clipping at the edges
            assert 0.2 < fractions[applied].mean() < 0.45


def _apply_cutmix(x1, y1, x2, y2, box):
    """The original's CutMix on full model inputs (16, 64, 64, 5): x2's box pasted into x1 in
    every channel and frame, targets (1 - a) y1 + a y2 with a the box's share of the canvas."""
    r1, c1, r2, c2 = box
    x = x1.copy()
    x[:, r1:r2, c1:c2, :] = x2[:, r1:r2, c1:c2, :]
    a = np.float32((r2 - r1) * (c2 - c1) / 4096)
    return x, (1.0 - a) * y1 + a * y2


def test_training_sample_equals_direct_computation(sim, reference):
    samples = _stream(sim).samples
    inputs = np.concatenate([np.asarray(pipeline.device_inputs(reference[0])),
                             np.asarray(jax.jit(pipeline.device_inputs)(reference[1]))])
    batch = {k: np.concatenate([reference[0][k], reference[1][k]]) for k in reference[0]}
    mixed = 0
    for position in range(8):
        d = samples.draw(0, position)
        mouse = sim.mice[d.mouse]

        def direct(trial_id: int, anchor: int, mouse=mouse):
            t = mouse.load_trial(trial_id)
            frames, traces = windows.compact_window(t.video, t.behavior, t.pupil_center, anchor)
            return (windows.expand_inputs(frames, traces, xp=np),
                    windows.window_targets(t.responses, anchor))

        x1, y1 = direct(d.trial, d.anchor)
        x2, y2 = direct(d.partner_trial, d.partner_anchor)
        x, y = _apply_cutmix(x1, y1, x2, y2, d.box)
        mixed += bool(d.box.any())
        np.testing.assert_array_equal(inputs[position], x)
        np.testing.assert_array_equal(batch["targets"][position, :, :12], y)
        assert batch["mouse"][position] == d.mouse and batch["neuron_mask"][position].all()
    assert 0 < mixed < 8  # both kinds of sample were checked


def test_targets_are_padded_and_masked(sim):
    mouse = sim.mice[0]
    trial = int(pipeline.training_trials(mouse, None)[0])
    draw = pipeline.SampleDraw(0, trial, 35, np.zeros(4, np.int64), trial, 40)
    record = pipeline.build_sample(mouse, draw, num_neurons=20)
    assert record["targets"].shape == (16, 20) and not record["targets"][:, 12:].any()
    np.testing.assert_array_equal(record["neuron_mask"], np.arange(20) < 12)
    assert not record["partner_traces"].any() and not record["box"].any()


def test_shards_split_every_global_batch(sim, reference):
    halves = []
    for shard in (0, 1):
        with _stream(sim, shard_index=shard, shard_count=2) as stream:
            halves.append(_take(stream, 3))
    joined = [{k: np.concatenate([h0[k], h1[k]]) for k in h0}
              for h0, h1 in zip(*halves, strict=True)]
    _assert_batches_equal(joined, reference[:3])


# --------------------------------------------------------------------------- pipeline.npz


@pytest.fixture(scope="module")
def fixture_mouse(tmp_path_factory, pipeline_fixture):
    """A one-mouse dataset whose trial 0 is pipeline.npz's item-3 trial."""
    f, _ = pipeline_fixture
    folder = tmp_path_factory.mktemp("fixture") / synthetic.mouse_names(1)[0]
    arrays = {"videos": f["trial/video"], "behavior": f["trial/behavior"],
              "pupil_center": f["trial/pupil_center"], "responses": f["trial/responses"]}
    for modality, array in arrays.items():
        (folder / "data" / modality).mkdir(parents=True)
        np.save(folder / "data" / modality / "0.npy", array)
    n = arrays["responses"].shape[0]
    for rel, value in (("trials/tiers", np.array(["train"], "<U16")),
                       ("neurons/unit_ids", np.arange(n, dtype=np.int64)),
                       ("neurons/cell_motor_coordinates", np.zeros((n, 3), np.float32))):
        (folder / "meta" / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(folder / "meta" / f"{rel}.npy", value)
    return SensoriumDataset.open(folder.parent).mice[0]


def test_stream_inputs_and_targets_equal_fixture(fixture_mouse, pipeline_fixture):
    f, _ = pipeline_fixture
    anchors = [int(a) for a in f["inputs/anchors"]]
    found = {}
    for batch in eval_windows.prediction_batches(fixture_mouse, [0], batch_size=64):
        x = np.asarray(pipeline.device_inputs(batch))
        for row in np.flatnonzero(batch["valid"]):
            if int(batch["anchor"][row]) in anchors:
                found[int(batch["anchor"][row])] = x[row]
    for i, anchor in enumerate(anchors):
        np.testing.assert_array_equal(found[anchor], _cl(f["inputs/x"][i]))
        _, _, target = window_reader.load_window(fixture_mouse, 0, anchor)
        np.testing.assert_array_equal(target, f["inputs/responses"][i].T)


@pytest.mark.parametrize("seed", ["0", "1", "2", "7"])
def test_training_cutmix_equals_fixture(fixture_mouse, pipeline_fixture, seed):
    f, meta = pipeline_fixture
    draw = meta["cutmix"]["seeds"][seed]
    box = windows.cutmix_box(draw["lam_drawn"], draw["center_cx"], draw["center_cy"])
    np.testing.assert_array_equal(box, f[f"cutmix/seed{seed}/box"])
    # x1 = item 3's window at anchor 30, x2 the one at anchor 101 (pipeline.npz README).
    record = pipeline.build_sample(fixture_mouse, pipeline.SampleDraw(0, 0, 30, box, 0, 101), 20)
    batch = {k: np.asarray(v)[None] for k, v in record.items()}
    x = np.asarray(pipeline.device_inputs(batch))[0]
    np.testing.assert_array_equal(x, _cl(f[f"cutmix/seed{seed}/inputs"]))
    expected = f[f"cutmix/seed{seed}/target"].T
    assert np.abs(record["targets"] - expected).max() / np.abs(expected).max() < 1e-5
    assert windows.box_fraction(record["box"]) == pytest.approx(draw["area_fraction"], abs=0)


# --------------------------------------------------------------------------- evaluation


def test_validation_windows_cover_the_fold(sim):
    rows = eval_windows.validation_windows(sim, fold=2)
    expected = {(m.index, int(t), 30 + 31 * k) for m in sim.mice
                for t in np.flatnonzero(folds.trial_folds(m) == 2)
                for k in range(int(m.lengths[t]) // 31)}
    assert {tuple(r) for r in rows.tolist()} == expected and len(rows) == len(expected)
    batches = list(eval_windows.validation_batches(sim, 2, batch_size=8))
    got = np.concatenate([np.stack([b["mouse"], b["trial"], b["anchor"]], 1) for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert len(got) == -(-len(rows) // 8) * 8 and valid.sum() == len(rows)
    np.testing.assert_array_equal(got[valid], rows)
    assert (got[~valid][:, 1:] == -1).all()
    # One window's content against the trial loaded directly.
    m, t, a = rows[-1]
    trial = sim.mice[m].load_trial(t)
    frames, traces = windows.compact_window(trial.video, trial.behavior, trial.pupil_center, a)
    last = batches[(len(rows) - 1) // 8]
    r = (len(rows) - 1) % 8
    np.testing.assert_array_equal(last["frames"][r], frames)
    np.testing.assert_array_equal(last["traces"][r], traces)
    np.testing.assert_array_equal(last["targets"][r], windows.window_targets(trial.responses, a))
    # Two hosts read the two halves of every global batch.
    halves = [list(eval_windows.validation_batches(sim, 2, 8, shard_index=h, shard_count=2))
              for h in (0, 1)]
    for b, h0, h1 in zip(batches, *halves, strict=True):
        np.testing.assert_array_equal(np.concatenate([h0["anchor"], h1["anchor"]]), b["anchor"])


@pytest.mark.parametrize("stride", [1, 4])
def test_prediction_blending_equals_a_direct_loop(sim, stride):
    mouse, trials = sim.mice[1], [0, 5, 9]
    lengths = {t: int(mouse.lengths[t]) for t in trials}
    rng = np.random.default_rng(0)
    blender = eval_windows.WindowBlender(lengths, mouse.num_neurons)
    ramp = eval_windows.WindowBlender(lengths, mouse.num_neurons)
    direct = {t: (np.zeros((mouse.num_neurons, n)), np.zeros(n)) for t, n in lengths.items()}
    for batch in eval_windows.prediction_batches(mouse, trials, batch_size=16, stride=stride):
        outputs = rng.normal(size=(16, 16, mouse.num_neurons)).astype(np.float32)
        blender.add(outputs, batch)
        # A fake model that outputs each frame's index: the blend must give it back.
        idx = windows.window_indexes(batch["anchor"])
        ramp.add(np.broadcast_to(idx[..., None], outputs.shape).astype(np.float32), batch)
        for b in np.flatnonzero(batch["valid"]):
            trial = int(batch["trial"][b])
            for k, frame in enumerate(windows.window_indexes(int(batch["anchor"][b]))):
                direct[trial][0][:, frame] += outputs[b, k]
                direct[trial][1][frame] += 1
    for t, n in lengths.items():
        sums, counts = direct[t]
        assert counts.min() >= 1
        np.testing.assert_allclose(blender.result(t), sums / counts, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(ramp.result(t), np.broadcast_to(np.arange(n), (12, n)))


def test_one_pass_over_several_strides_blends_each(sim):
    """The union of strides 1 and 8 read once: each stride's blender equals a pass over its own
    windows only (the stride sweep of the prediction report)."""
    mouse, trials = sim.mice[0], [1, 4]
    lengths = {t: int(mouse.lengths[t]) for t in trials}

    def outputs(batch):  # a fake model: each window's output depends on (trial, anchor) only
        seeds = batch["trial"] * 1000 + batch["anchor"]
        return np.stack([np.random.default_rng(int(s) % 2**32).normal(
            size=(16, mouse.num_neurons)) for s in seeds]).astype(np.float32)

    both = {s: eval_windows.WindowBlender(lengths, mouse.num_neurons, stride=s) for s in (1, 8)}
    for batch in eval_windows.prediction_batches(mouse, trials, 16, stride=(1, 8)):
        for blender in both.values():
            blender.add(outputs(batch), batch)
    for stride in (1, 8):
        alone = eval_windows.WindowBlender(lengths, mouse.num_neurons)
        for batch in eval_windows.prediction_batches(mouse, trials, 16, stride=stride):
            alone.add(outputs(batch), batch)
        for t, n in lengths.items():
            np.testing.assert_array_equal(both[stride].counts[t], windows.window_counts(
                n, windows.prediction_anchors(n, stride)))
            np.testing.assert_array_equal(both[stride].result(t), alone.result(t))
    rows = eval_windows.prediction_windows(mouse, trials, (1, 8))
    assert len(rows) == sum(n - 30 for n in lengths.values())  # stride 8's anchors are in 1's


# --------------------------------------------------------------------------- resume, workers


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_sees_the_same_batches(sim, reference, workers):
    with _stream(sim, num_workers=workers) as first:
        before = _take(first, 4)
        state = json.loads(json.dumps(first.get_state()))
    assert state["next_batch"] == 4
    with _stream(sim, num_workers=workers) as resumed:
        resumed.set_state(state)
        assert resumed.epoch == 0
        after = _take(resumed, 4)  # crosses into epoch 1
        assert resumed.epoch == 1
    _assert_batches_equal(before + after, reference[:8])
    with pytest.raises(ValueError, match="seed 3"):
        _stream(sim, seed=5).set_state(state)


def _shadow_root(sim_root: Path, target: Path) -> Path:
    """A copy of the dataset made of symbolic links, so that a test can damage one file."""
    for path in sim_root.rglob("*"):
        if path.is_file() and "simulation" not in path.parts:
            link = target / path.relative_to(sim_root)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return target


def test_missing_file_raises_dataset_error_naming_it(sim_root, tmp_path):
    root = _shadow_root(sim_root, tmp_path / "shadow")
    stream = _stream(root)
    d = stream.samples.draw(0, 0)
    path = stream.dataset.mice[d.mouse].path_of("responses", d.trial)
    os.unlink(path)
    with pytest.raises(DatasetError, match=f"{path}: file is missing"):
        next(stream)


_WORKER_ERROR_SCRIPT = """
import multiprocessing, sys, time
from absl import flags
flags.FLAGS.mark_as_parsed()
from dwise_jax.config import get_base_config
from dwise_jax.data import pipeline
from dwise_jax.data.sensorium import DatasetError


def main(root):
    config = get_base_config()
    config.data.update(batch_size=4, train_epoch_size=24, num_workers=2)
    stream = pipeline.TrainStream(root, config, fold=0)
    d = stream.samples.draw(0, 4)  # the first batch of worker 1
    path = stream.dataset.mice[d.mouse].path_of("videos", d.trial)
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 3])  # truncated after the stream was built
    print("DAMAGED", path, flush=True)
    try:
        for _ in range(20):
            next(stream)
        print("NO ERROR")
    except DatasetError as err:
        print("ERROR", type(err).__name__, err, flush=True)
    deadline = time.monotonic() + 120  # the pool must be gone, not waiting (a wide margin)
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    print("CHILDREN", len(multiprocessing.active_children()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
"""


def test_worker_error_surfaces_in_main_process(sim_root, tmp_path):
    root = _shadow_root(sim_root, tmp_path / "shadow")
    script = tmp_path / "worker_error.py"
    script.write_text(textwrap.dedent(_WORKER_ERROR_SCRIPT))
    # A subprocess with a timeout: a hanging pool fails the test instead of stalling it.
    done = subprocess.run([sys.executable, str(script), str(root)], capture_output=True,
                          text=True, timeout=HANG_TIMEOUT_S, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    damaged = next(line for line in lines if line.startswith("DAMAGED")).split(" ", 1)[1]
    error = next((line for line in lines if line.startswith("ERROR")), done.stdout)
    assert error.startswith(f"ERROR DatasetError {damaged}: is not a readable .npy file"), error
    assert "CHILDREN 0" in lines


def test_state_goes_into_a_fold_checkpoint(sim, tmp_path):
    from dwise_jax import checkpoint

    stream = _stream(sim)
    stream.set_state(stream.get_state() | {"next_batch": 5})
    state = stream.get_state()
    assert pipeline.decode_state(json.dumps(state)) == state
    checkpoint.save(tmp_path, 5, {"loader": {"state": pipeline.encode_state(state)}})
    _, restored = checkpoint.restore(tmp_path, ("loader",))
    assert pipeline.decode_state(restored["loader"]["state"]) == state
