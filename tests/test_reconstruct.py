"""Movie reconstruction (dwise_jax/reconstruct.py): the normalised, window- and model-averaged
gradient against a NumPy loop of single-window gradients, the update (mask, clipping, Adam's
first moment, warm-up, 0..255), the mask's pixel shares, and the command end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S, random_fold

from dwise_jax import checkpoint, experiment, inference, losses, reconstruct
from dwise_jax.data import folds, windows
from dwise_jax.data.sensorium import SensoriumDataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(sim_root, tmp_path_factory):
    dataset = SensoriumDataset.open(sim_root)
    work = tmp_path_factory.mktemp("reconstruct")
    dirs = [random_fold(work, e, 0, dataset, seed=s) for e, s in (("a", 1), ("b", 2))]
    return work, dataset, dirs


def numpy_direction(dirs, mouse, frames, traces, targets):
    """The published loop: one model, one window, one gradient at a time; NumPy averaging."""
    length = len(frames)
    per_model = []
    for directory in dirs:
        model, spec, _ = checkpoint.load_ema_model(directory)
        index = spec.mice.index(mouse.name)

        @jax.jit
        def grad(f, t, y, model=model, index=index):
            def loss(f):
                x = windows.expand_inputs(f[None], t[None])
                return jnp.sum(losses.poisson_nll(model(x, readout_index=index)[0], y))
            return jax.grad(loss)(f)

        sums, counts = np.zeros(frames.shape), np.zeros(length)
        for anchor in windows.prediction_anchors(length):
            idx = windows.window_indexes(anchor)
            g = np.asarray(grad(frames[idx], traces[idx], targets[idx]), np.float64)
            sums[idx] += g / np.sqrt(np.sum(g ** 2))
            counts[idx] += 1
        per_model.append(sums / counts[:, None, None])
    return np.mean(per_model, axis=0)


def test_direction_equals_the_numpy_loop(setup):
    work, dataset, dirs = setup
    mouse = dataset.mice[0]
    trial = mouse.load_trial(2)
    frames, traces = inference.trial_arrays(trial.video, trial.behavior, trial.pupil_center)
    targets = np.maximum(np.asarray(trial.responses[:, :trial.length], np.float32), 0).T
    frames = frames * 0.5 + 40  # not the video the model saw: a non-trivial gradient
    want = numpy_direction(dirs, mouse, frames, traces, targets)
    ens = inference.load_ensemble(work, ["a", "b"])
    plan = inference.WindowPlan.of(trial.length, chunk=7)  # 7 does not divide the 60 windows
    got, _ = jax.jit(lambda v: reconstruct.direction(
        ens.graphdef, ens.states, v, jnp.asarray(traces), jnp.asarray(targets), plan,
        ens.readout_index(mouse)))(jnp.asarray(frames))
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * scale, rtol=0)


def test_adam_step_masks_clips_and_corrects_bias():
    cfg = reconstruct.ReconConfig(lr=100.0, warmup=4, beta1=0.8, grad_clip=1.0)
    rng = np.random.default_rng(0)
    video = rng.uniform(0, 255, (3, 36, 64)).astype(np.float32)
    grad = rng.normal(0, 3, video.shape).astype(np.float32)  # many beyond +-1
    mask = np.zeros((36, 64), np.float32)
    mask[10:20, 5:30] = 1
    moment = rng.normal(0, 0.1, video.shape).astype(np.float32)
    for step in (0, 1, 7):
        v, m = reconstruct.adam_step(jnp.asarray(video), jnp.asarray(moment), jnp.asarray(grad),
                                     jnp.asarray(mask), step, cfg)
        g = np.clip(grad * mask, -1, 1)
        want_m = 0.8 * moment + 0.2 * g
        lr = 100.0 * min(1.0, (step + 1) / 4)
        want_v = np.clip(video - lr * want_m / (1 - 0.8 ** (step + 1)), 0, 255)
        np.testing.assert_allclose(np.asarray(m), want_m, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(v), want_v, rtol=1e-5, atol=1e-3)
    assert np.abs(g).max() == 1.0 and np.asarray(v).min() == 0 and np.asarray(v).max() == 255
    # Outside the mask, only the old moment moves the video.
    still = mask == 0
    np.testing.assert_allclose(np.asarray(m)[:, still], 0.8 * moment[:, still], rtol=1e-6)


def test_mask_shares():
    energy = np.array([[0.5, 0.3], [0.15, 0.05]])
    assert reconstruct.top_share(energy, 0.5).tolist() == [[True, False], [False, False]]
    assert reconstruct.top_share(energy, 0.6).tolist() == [[True, True], [False, False]]
    assert reconstruct.top_share(energy, 0.9).tolist() == [[True, True], [True, False]]
    assert reconstruct.top_share(energy, 1.0).all()


def test_population_mask_and_the_loss_going_down(setup):
    work, dataset, _ = setup
    ens = inference.load_ensemble(work, ["a"])
    mouse = dataset.mice[0]
    cfg = reconstruct.ReconConfig(mask_windows=6, chunk=4, iterations=6, warmup=1, lr=30.0,
                                  eval_every=1, anchor_stride=8)
    mask = reconstruct.population_mask(ens, mouse, [0, 1], cfg)
    assert mask["energy"].shape == (36, 64) and mask["energy"].max() == 1.0
    assert mask["energy"].min() >= 0
    assert (mask["score"] <= mask["update"]).all() and mask["score"].sum() < mask["update"].sum()
    trial = mouse.load_trial(2)
    truth, traces = inference.trial_arrays(trial.video, trial.behavior, trial.pupil_center)
    targets = np.maximum(np.asarray(trial.responses[:, :trial.length], np.float32), 0).T
    video, curve = reconstruct.reconstruct_trial(ens, traces, targets, mask["update"], cfg,
                                                 ens.readout_index(mouse), truth, mask["score"])
    assert video.shape == truth.shape and 0 <= video.min() and video.max() <= 255
    assert [c["iteration"] for c in curve] == list(range(1, 7))
    assert curve[-1]["loss"] < curve[0]["loss"]
    # Pixels outside the update mask stay mid-grey.
    np.testing.assert_array_equal(video[:, ~mask["update"]], 127.5)


def test_command_end_to_end(setup, tmp_path):
    work, dataset, _ = setup
    mouse = dataset.mice[1]
    trial = int(np.flatnonzero([mouse.is_labeled(t) and f == 0
                                for t, f in enumerate(folds.trial_folds(mouse))])[0])
    args = [sys.executable, "-m", "dwise_jax.reconstruct", "--experiment=a,b", "--split=folds",
            f"--workdir={work}", f"--mice={mouse.name}", f"--trials={trial}", "--folds=0",
            "--iterations=3", "--eval_every=1", "--anchor_stride=8", "--mask_windows=4",
            "--ensemble_sizes=1,0", f"--out={tmp_path / 'out'}"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=HANG_TIMEOUT_S, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    array = np.load(out / mouse.name / f"{trial}.npy")
    assert array.shape == (36, 64, int(mouse.lengths[trial])) and array.dtype == np.float32
    for name in (f"{mouse.name}/{trial}.png", f"{mouse.name}/{trial}.gif", "curves.png",
                 f"masks/{mouse.name}.npz", f"masks/{mouse.name}.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "report.json").read_text())
    (row,) = data["trials"]
    assert row["folds"] == [0, 0] and sorted(row["by_size"]) == ["1", "2"]
    assert [c["iteration"] for c in row["by_size"]["2"]["curve"]] == [1, 2, 3]
    assert "| 2 |" in (out / "report.md").read_text()
    assert row["linear"]["lags"] == 8 and -1 <= row["linear"]["corr"] <= 1
    assert "| linear decoder" in (out / "report.md").read_text()

    with pytest.raises(experiment.PredictionError, match=r"no mouse is 'nobody' .*its mice are"):
        reconstruct.reconstruct_split(work, ["a"], "folds", mice=["nobody"], out=tmp_path / "x")
    with pytest.raises(experiment.PredictionError, match="no trials of split folds"):
        reconstruct.reconstruct_split(work, ["a"], "folds", trials=[10**6], out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_blur_by_hand():
    """The Gaussian blur of the update: a constant stays constant (rows renormalised at the
    edges), a point away from the edges becomes the separable normalised Gaussian, sigma 0 is
    the identity."""
    x = np.zeros((2, 36, 64), np.float32)
    x[1, 18, 30] = 1.0
    out = np.asarray(reconstruct.blur(jnp.asarray(x), 1.5))
    r = np.arange(-10, 11)
    g = np.exp(-0.5 * (r / 1.5) ** 2)
    g /= g.sum()
    np.testing.assert_allclose(out[1, 8:29, 20:41], np.outer(g, g), atol=1e-6)
    assert np.abs(out[0]).max() == 0 and out[1].sum() == pytest.approx(1.0, abs=1e-5)
    flat = np.full((36, 64), 7.0, np.float32)
    np.testing.assert_allclose(np.asarray(reconstruct.blur(jnp.asarray(flat), 3.0)), flat,
                               rtol=1e-5)
    assert reconstruct.blur(x, 0.0) is x
