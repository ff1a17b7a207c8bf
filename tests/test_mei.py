"""Most exciting inputs (dwise_jax/mei.py): the budget and pixel range hold, the response rises
above the training windows', the energy centre by hand, and the command end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S, call_command, random_fold

from dwise_jax import experiment, inference, mei
from dwise_jax.data import folds
from dwise_jax.data.sensorium import SensoriumDataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(sim_root, tmp_path_factory):
    dataset = SensoriumDataset.open(sim_root)
    work = tmp_path_factory.mktemp("mei")
    for k in (0, 1):
        random_fold(work, "m", k, dataset, seed=10 + k)
    return work, dataset


def test_energy_centre_by_hand():
    x = np.full((16, 36, 64), 100.0)
    x[3, 5, 10] = 110.0
    x[7, 5, 20] = 90.0  # same energy, same row: centre halfway
    assert mei.energy_centre(x, 100.0) == pytest.approx((5.0, 15.0))


def test_meis_respect_the_budget_and_beat_the_training_windows(setup):
    work, dataset = setup
    ens = inference.load_ensemble(work, "m")
    mouse = dataset.mice[0]
    cfg = mei.MeiConfig(steps=40, train_windows=32, batch=2)
    found = mei.find_meis(ens, mouse, [0, 3, 5], cfg)
    meis = found["meis"]
    assert meis.shape == (3, 16, 36, 64) and meis.min() >= 0 and meis.max() <= 255
    norms = np.sqrt(np.sum((meis - found["level"]) ** 2, axis=(1, 2, 3)))
    assert (norms <= found["norm"] * (1 + 1e-4)).all() and (norms > 0.5 * found["norm"]).all()
    # The reported response is the ensemble's response to the MEI (recomputed here).
    held = np.broadcast_to(found["traces"].astype(np.float32), (3, 16, 4))
    again = np.asarray(mei._responses(ens.graphdef, ens.states, meis, held, 0))
    np.testing.assert_allclose(again[[0, 1, 2], [0, 3, 5]], found["response"], rtol=1e-4)
    assert (found["response"] > found["best_train"]).all()
    with pytest.raises(experiment.PredictionError, match="not \\[99\\]"):
        mei.find_meis(ens, mouse, [99], cfg)


def test_command_end_to_end(setup, tmp_path, monkeypatch):
    work, dataset = setup
    mouse = dataset.mice[2]
    run = subprocess.run([sys.executable, "-m", "dwise_jax.mei", "--experiment=m",
                          f"--mouse={mouse.name}", "--neurons=1,4", f"--workdir={work}",
                          "--steps=5", "--train_windows=8", f"--out={tmp_path / 'o'}"],
                         capture_output=True, text=True, timeout=HANG_TIMEOUT_S, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "o"
    assert np.load(out / "1.npy").shape == (36, 64, 16)
    for name in ("1.png", "4.png", "distances.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert [r["neuron"] for r in report["neurons"]] == [1, 4] and len(report["members"]) == 2
    info = json.loads((dataset.root / "simulation" / "simulation.json").read_text())
    rf = next(m for m in info["mouse_info"] if m["name"] == mouse.name)["receptive_fields"]
    row = report["neurons"][1]
    assert row["true_centre"] == [rf["center_y"][4], rf["center_x"][4]]
    assert row["distance_px"] == pytest.approx(np.hypot(
        row["energy_centre"][0] - rf["center_y"][4], row["energy_centre"][1] - rf["center_x"][4]))

    # --best instead of --neurons: the best predicted neurons, each with its held-out r.
    # (In process: the command line's one subprocess run is the one above.)
    assert call_command("mei", ["--experiment=m", f"--mouse={mouse.name}", "--best=2",
                                f"--workdir={work}", "--steps=2", "--train_windows=8",
                                f"--out={tmp_path / 'b'}"], monkeypatch) == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    r = [row["held_out_corr"] for row in report["neurons"]]
    assert len(r) == 2 and r[0] >= r[1]
    assert report["selection"] == "the 2 neurons best predicted on held-out trials"
    text = (tmp_path / "b" / "report.md").read_text()
    assert f"| {report['neurons'][0]['neuron']} ({r[0]:.2f}) |" in text


def test_best_neurons_rank_by_held_out_correlation(setup):
    """Each fold's trials predicted by that fold's model alone, the correlation per neuron
    over all those frames (np.corrcoef here), the best first."""
    work, dataset = setup
    mouse = dataset.mice[0]
    ens = inference.load_ensemble(work, "m")
    chosen, corr = mei.best_neurons(ens, mouse, 3, max_trials=2)
    trial_fold = folds.trial_folds(mouse)
    preds, resps = [], []
    for k in (0, 1):
        alone = inference.load_ensemble(work, "m", [k])
        ids = [t for t in range(mouse.num_trials) if trial_fold[t] == k and mouse.is_labeled(t)]
        for t in ids[:2]:
            data = mouse.load_trial(t)
            p = alone.predict(data.video, data.behavior, data.pupil_center, mouse,
                              anchor_stride=8)
            preds.append(p)
            resps.append(mouse.load("responses", t)[:, :p.shape[1]])
    a, b = np.concatenate(preds, 1), np.concatenate(resps, 1)
    want = np.array([np.corrcoef(a[n], b[n])[0, 1] for n in range(mouse.num_neurons)])
    np.testing.assert_allclose(corr, want, atol=1e-6)
    assert chosen == list(np.argsort(-want)[:3])
