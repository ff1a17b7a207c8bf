"""The ensemble API (dwise_jax/inference.py): whole-trial prediction of stacked fold models
against the direct NumPy blend of test_predict, chunking, the video function and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import direct_blend, random_fold

from dwise_jax import experiment, inference
from dwise_jax.data.sensorium import SensoriumDataset


@pytest.fixture(scope="module")
def two_folds(sim_root, tmp_path_factory):
    dataset = SensoriumDataset.open(sim_root)
    work = tmp_path_factory.mktemp("inference")
    dirs = [random_fold(work, "exp", k, dataset, seed=k + 3) for k in (0, 1)]
    return work, dataset, dirs


def test_predict_equals_the_direct_blend_of_both_folds(two_folds):
    work, dataset, dirs = two_folds
    ens = inference.load_ensemble(work, "exp")
    assert ens.size == 2 and ens.folds == [0, 1]
    mouse = dataset.mice[1]
    trial = mouse.load_trial(3)
    want = direct_blend(dirs, mouse, 3)
    for chunk in (5, 32):  # a chunk smaller than the window count, and one larger
        got = ens.predict(trial.video, trial.behavior, trial.pupil_center, mouse, chunk=chunk)
        assert got.shape == (mouse.num_neurons, trial.length)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5 * np.abs(want).max())
    one = ens.subset([1]).predict(trial.video, trial.behavior, trial.pupil_center, mouse.name)
    np.testing.assert_allclose(one, direct_blend(dirs[1:], mouse, 3), rtol=2e-4,
                               atol=1e-5 * np.abs(want).max())


def test_video_function_is_differentiable_and_per_model(two_folds):
    work, dataset, dirs = two_folds
    ens = inference.load_ensemble(work, "exp")
    mouse = dataset.mice[0]
    trial = mouse.load_trial(0)
    frames, _ = inference.trial_arrays(trial.video, trial.behavior, trial.pupil_center)
    f = ens.video_function(trial.behavior, trial.pupil_center, mouse, trial.length, chunk=8)
    out = jax.jit(f)(jnp.asarray(frames))
    assert out.shape == (2, trial.length, mouse.num_neurons)
    np.testing.assert_allclose(np.asarray(out[0]).T, direct_blend(dirs[:1], mouse, 0),
                               rtol=2e-4, atol=1e-5 * float(jnp.abs(out).max()))
    grad = jax.grad(lambda v: f(v)[:, 40].sum())(jnp.asarray(frames))
    # Frame 40's output sees only the frames of the windows covering it: 10 .. 70.
    energy = np.asarray(jnp.abs(grad).sum(axis=(1, 2)))
    assert energy[10:71].sum() > 0 and energy[:10].sum() == 0 and energy[71:].sum() == 0


def test_clear_errors(two_folds, tmp_path):
    work, dataset, _ = two_folds
    ens = inference.load_ensemble(work, "exp")
    with pytest.raises(experiment.PredictionError, match="no readout for mouse nobody"):
        ens.readout_index("nobody")
    with pytest.raises(experiment.PredictionError, match="no fold folders"):
        inference.load_ensemble(tmp_path, "exp")
    trial = dataset.mice[0].load_trial(0)
    with pytest.raises(ValueError, match=r"\(36, 64, T\)"):
        ens.predict(trial.video[:10], trial.behavior, trial.pupil_center, dataset.mice[0])
