"""The reference scores of a validation fold: ridge baseline features and fit, noise ceiling."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S, call_command

from dwise_jax import baseline
from dwise_jax.data.sensorium import SensoriumDataset


def test_frame_features_lags_and_blocks():
    rng = np.random.default_rng(0)
    video = rng.uniform(0, 255, size=(36, 64, 20)).astype(np.float32)
    behavior, pupil = rng.normal(size=(2, 20)), rng.normal(size=(2, 20))
    x = baseline.frame_features(video, behavior, pupil, 12)
    blocks = 9 * 16
    assert x.shape == (12, blocks * len(baseline.LAGS) + 4 + 1)
    # Block (0, 0) at frame t is the mean of pixels 0..3 x 0..3 / 255.
    np.testing.assert_allclose(x[5, 0], video[:4, :4, 5].mean() / 255, rtol=1e-5)
    # The second block of columns (lag 2) at frame t holds frame t - 2.
    np.testing.assert_allclose(x[5, blocks], video[:4, :4, 3].mean() / 255, rtol=1e-5)
    # Before the start the first frame is repeated; the last column is the intercept.
    np.testing.assert_allclose(x[0, blocks], x[0, 0])
    assert np.all(x[:, -1] == 1)


def test_ridge_recovers_a_linear_map():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(500, 6)), np.ones((500, 1))], axis=1)
    w = rng.normal(size=(7, 3))
    np.testing.assert_allclose(baseline._ridge(x, x @ w, 1e-6), w, atol=1e-4)


def test_ridge_is_positive_and_below_the_ceiling(sim_root, capsys, monkeypatch):
    assert baseline.is_simulated(SensoriumDataset.open(sim_root))
    assert call_command("baseline", ["--root", str(sim_root), "--fold", "0"], monkeypatch) == 0
    out = capsys.readouterr().out
    ridge = float(re.search(r"fold 0: ridge baseline val_corr (\S+)", out)[1])
    ceiling = float(re.search(r"fold 0: noise ceiling val_corr (\S+)", out)[1])
    assert 0.0 < ridge < ceiling < 1.0


@pytest.mark.parametrize("args, status, message", [
    ([], 2, "error: --root is required, e.g. --root data/simulated (see --help)"),
    (["--root", "ROOT", "--fold", "7"], 2,
     "error: flag --fold=7: 7 is not an integer in the range [0, 6] (see --help)"),
    (["--root", "ROOT/nope"], 1, "error: ROOT/nope: dataset root folder is missing"),
])
def test_bad_command_lines_give_one_error_line(tmp_path, capsys, monkeypatch, args, status,
                                                message):
    args = [a.replace("ROOT", str(tmp_path)) for a in args]
    assert call_command("baseline", args, monkeypatch) == status
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [message.replace("ROOT", str(tmp_path))]


def test_the_module_runs_as_a_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dwise_jax.baseline", "--root",
                           str(tmp_path / "nope")], capture_output=True, text=True,
                          timeout=HANG_TIMEOUT_S)
    assert done.returncode == 1
    message = f"error: {tmp_path / 'nope'}: dataset root folder is missing"
    assert done.stderr.splitlines() == [message]
