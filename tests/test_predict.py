"""Prediction end to end: the original predictor's blend of the small fixture model
(pipeline.npz item 4), fold blending and out-of-fold predictions against a direct NumPy loop,
anchor strides, scores against a NumPy reference, the report, the ensemble and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import (
    HANG_TIMEOUT_S,
    TEST_MODEL,
    call_command,
    competition_reference,
    direct_blend,
    fixture_model,
    model_kwargs,
    normwise,
    random_fold,
    save_fold,
)
from flax import nnx

from dwise_jax import atomic, checkpoint, experiment, predict, sharding, submission
from dwise_jax.data import eval_windows, folds, synthetic, windows
from dwise_jax.data.sensorium import SensoriumDataset
from dwise_jax.models.dwiseneuro import DwiseNeuro

REPO = Path(__file__).resolve().parents[1]
SPLIT = "live_test_main"
# A small, fast network: prediction does not care what the weights are.


# --------------------------------------------------------------------------- pipeline.npz item 4


@pytest.fixture(scope="module")
def fixture_setup(tmp_path_factory, pipeline_fixture, small_model_fixture):
    """Two mice (readouts of 7 and 11 neurons) whose trial 0 is item 3's trial, unlabeled in
    live_test_main, and a converted-style fold (no config.json) with the small model fixture."""
    f, _ = pipeline_fixture
    arrays, meta = small_model_fixture
    base = tmp_path_factory.mktemp("fixture_predict")
    root, names = base / "data", synthetic.mouse_names(2)
    kwargs = model_kwargs(**meta["constructor_kwargs"])
    for name, n in zip(names, kwargs["readout_outputs"], strict=True):
        folder = root / name
        length = f["trial/video"].shape[-1]
        dummy = np.zeros((n, length), np.float32)
        dummy[:, 300:] = np.nan
        files = {"data/videos/0": f["trial/video"], "data/behavior/0": f["trial/behavior"],
                 "data/pupil_center/0": f["trial/pupil_center"], "data/responses/0": dummy,
                 "meta/trials/tiers": np.array([SPLIT], "<U16"),
                 "meta/neurons/unit_ids": np.arange(10, 10 + n, dtype=np.int64),
                 "meta/neurons/cell_motor_coordinates": np.zeros((n, 3), np.float32),
                 "meta/statistics/responses/all/std": np.full((n, length), 2.0, np.float32)}
        for rel, value in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{rel}.npy", value)
    state = nnx.state(fixture_model(arrays, meta), (nnx.Param, nnx.BatchStat))
    save_fold(base / "work", "fixture", 0, kwargs, names, state, data_root=None)
    return base / "work", root, names


def test_predictions_equal_the_original_predictor(fixture_setup, pipeline_fixture,
                                                  monkeypatch):
    f, _ = pipeline_fixture
    workdir, root, names = fixture_setup
    blenders = []

    class Recorded(eval_windows.WindowBlender):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            blenders.append(self)

    monkeypatch.setattr(eval_windows, "WindowBlender", Recorded)
    # 270 windows per trial: batches of 90 need no padding.
    result = predict.predict_split(workdir, "fixture", SPLIT, data_root=str(root), batch_size=90)
    out = experiment.predictions_dir(workdir, "fixture", SPLIT)
    assert result["directory"] == out and "scores" not in result  # real data: not scored
    for i, name in enumerate(names):
        pred = np.load(out / name / "0.npy")
        assert pred.dtype == np.float32 and pred.shape == f[f"predict/readout/{i}"].shape
        assert normwise(pred, f[f"predict/readout/{i}"]) < 1e-4
    assert len(blenders) == 2  # one per mouse (one fold, stride 1)
    for blender in blenders:
        np.testing.assert_array_equal(blender.counts[0], f["indexes/predictor/window_count"])
    # The submission: the winner's cut of prediction / std (std 2 everywhere), mice in order.
    table = pq.read_table(result["submission"]).to_pylist()
    assert result["submission"].name == submission.SPLIT_FILES[SPLIT]
    assert [(r["mouse"], r["trial_indices"]) for r in table] == [(n, 0) for n in names]
    for i, row in enumerate(table):
        expected = f[f"predict/readout/{i}"][:, 50:299] / 2.0
        assert normwise(np.array(row["prediction"]), expected) < 1e-4
    assert json.loads((out / experiment.MANIFEST).read_text())["trials"] == {n: [0] for n in names}


def test_raw_windows_equal_fixture(fixture_setup, pipeline_fixture):
    f, _ = pipeline_fixture
    workdir, root, _ = fixture_setup
    (model,) = predict.load_fold_models(experiment.fold_folders(workdir, "fixture"),
                                        sharding.make_mesh())
    dataset = SensoriumDataset.open(root)
    # The jitted forward of a batch of windows against the original's raw window outputs.
    anchors = f["predict/window_anchors"]
    data = dataset.mice[1].load_trial(0)
    compact = [windows.compact_window(data.video, data.behavior, data.pupil_center, int(a))
               for a in anchors]
    frames, traces = (np.stack(c) for c in zip(*compact, strict=True))
    out = np.asarray(predict.forward(model, frames, traces, 1))
    assert normwise(out.transpose(0, 2, 1), f["predict/window/1"]) < 1e-4


def test_converted_folds_need_a_data_root_and_a_split_with_trials(fixture_setup):
    workdir, root, _ = fixture_setup
    with pytest.raises(experiment.PredictionError, match="pass --data_root"):
        predict.predict_split(workdir, "fixture", SPLIT)
    with pytest.raises(experiment.PredictionError, match="has no final_test_main trials"):
        predict.predict_split(workdir, "fixture", "final_test_main", data_root=str(root))


# --------------------------------------------------------------------------- simulated data


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> SensoriumDataset:
    root = tmp_path_factory.mktemp("predict_sim") / "sensorium"
    synthetic.generate(root, mice=2, neurons=6, trials=24, frames=80, seed=1)
    return SensoriumDataset.open(root)


@pytest.fixture(scope="module")
def oof_folds(sim) -> list[int]:
    """The two folds with the most labeled trials (the simulated hashes decide)."""
    counts = sum(folds.fold_counts(folds.trial_folds(m)) for m in sim.mice)
    return sorted(int(k) for k in np.argsort(counts)[-2:])


@pytest.fixture(scope="module")
def work(tmp_path_factory, sim, oof_folds) -> Path:
    """Experiments a and b, each with the two folds, different random weights."""
    workdir = tmp_path_factory.mktemp("predict_work")
    for name, seed in (("a", 0), ("b", 10)):
        for fold in oof_folds:
            random_fold(workdir, name, fold, sim, seed + fold)
    return workdir


@pytest.fixture(scope="module")
def predicted(work) -> dict:
    """a and b on the test split (stride 1, a with the stride sweep) and a out of fold."""
    return {"a": predict.predict_split(work, "a", SPLIT, batch_size=16, stride_sweep=(4, 30)),
            "b": predict.predict_split(work, "b", SPLIT, batch_size=16, stride_sweep=()),
            "folds": predict.predict_split(work, "a", "folds", batch_size=16, stride_sweep=())}


def _files(directory: Path, trials: dict) -> dict[str, list[np.ndarray]]:
    return {m: [np.load(directory / m / f"{t}.npy") for t in ts] for m, ts in trials.items()}


def test_test_split_blends_windows_and_folds(sim, work, predicted, oof_folds):
    result = predicted["a"]
    expected_trials = {m.name: m.trial_ids(SPLIT).tolist() for m in sim.mice}
    assert result["manifest"]["trials"] == expected_trials
    assert [f["fold"] for f in result["manifest"]["folds"]] == oof_folds
    mouse = sim.mice[1]
    trial = expected_trials[mouse.name][0]
    pred = np.load(result["directory"] / mouse.name / f"{trial}.npy")
    assert pred.dtype == np.float32 and pred.shape == (mouse.num_neurons, mouse.lengths[trial])
    fold_dirs = [checkpoint.fold_dir(work, "a", k) for k in oof_folds]
    assert normwise(pred, direct_blend(fold_dirs, mouse, trial)) < 1e-5
    # Scores: the competition correlation of the written arrays against the kept-aside truth.
    trials = result["manifest"]["trials"]
    preds = _files(result["directory"], trials)
    truth = {m: [synthetic.load_truth(sim.root, m, t)[:, : sim.mouse(m).lengths[t]]
                 for t in ts] for m, ts in trials.items()}
    rates = {m: [synthetic.load_truth(sim.root, m, t, noiseless=True)[:, : sim.mouse(m).lengths[t]]
                 for t in ts] for m, ts in trials.items()}
    scores = result["scores"].to_json()
    want = competition_reference(preds, truth)
    assert scores["correlation"] == pytest.approx(
        np.mean(np.concatenate(list(want.values()))), abs=1e-6)
    assert scores["noise_ceiling"] == pytest.approx(
        np.mean(np.concatenate(list(competition_reference(rates, truth).values()))), abs=1e-6)
    assert [m["correlation"] for m in scores["mice"]] == pytest.approx(
        [np.mean(r) for r in want.values()], abs=1e-6)
    assert [s["stride"] for s in scores["strides"]] == [1, 4, 30]
    assert scores["strides"][0]["correlation"] == scores["correlation"]
    # The report.
    report_dir = work / "reports" / "a" / SPLIT
    text = (report_dir / "report.md").read_text()
    assert f"**{scores['correlation']:.4f}**" in text and "noise ceiling" in text
    for png in ("correlations.png", "traces.png", "stride.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((report_dir / "scores.json").read_text())["correlation"] == pytest.approx(
        scores["correlation"])
    # The submission holds every trial of the split, cut as the competition takes it.
    rows = pq.read_table(result["submission"]).to_pylist()
    assert [(r["mouse"], r["trial_indices"]) for r in rows] == [
        (m, t) for m, ts in expected_trials.items() for t in ts]
    first = rows[0]
    length = sim.mouse(first["mouse"]).lengths[first["trial_indices"]]
    assert np.array(first["prediction"]).shape == (6, min(length, 300) - 1 - 50)


def test_anchor_stride_command_line_equals_the_sweep(sim, work, predicted, oof_folds, tmp_path,
                                                     monkeypatch):
    # Another workdir that sees a's folds: its predictions do not replace the module's.
    os.symlink(work / "a", tmp_path / "a")
    # In process (the command line's one subprocess run is the --split-only test's).
    assert call_command("predict", ["--experiment=a", f"--split={SPLIT}", f"--workdir={tmp_path}",
                                    "--anchor_stride=4", "--batch_size=16"], monkeypatch) == 0
    manifest = json.loads((experiment.predictions_dir(tmp_path, "a", SPLIT) / "manifest.json")
                          .read_text())
    assert manifest["anchor_stride"] == 4
    mouse = sim.mice[0]
    trial = manifest["trials"][mouse.name][0]
    pred = np.load(experiment.predictions_dir(tmp_path, "a", SPLIT) / mouse.name / f"{trial}.npy")
    fold_dirs = [checkpoint.fold_dir(work, "a", k) for k in oof_folds]
    assert normwise(pred, direct_blend(fold_dirs, mouse, trial, stride=4)) < 1e-5
    scores = json.loads((tmp_path / "reports" / "a" / SPLIT / "scores.json").read_text())
    sweep = predicted["a"]["scores"].to_json()["strides"]
    assert scores["correlation"] == pytest.approx(sweep[1]["correlation"], abs=1e-6)
    assert "strides" not in scores  # no sweep at stride 4: it would need more windows


def test_out_of_fold_predictions_use_their_own_fold(sim, work, predicted, oof_folds):
    result = predicted["folds"]
    trials = result["manifest"]["trials"]
    for mouse in sim.mice:
        trial_fold = folds.trial_folds(mouse)
        expected = [int(t) for t in np.flatnonzero(np.isin(trial_fold, oof_folds))
                    if mouse.is_labeled(int(t))]
        assert trials.get(mouse.name, []) == expected
    mouse = sim.mice[0]
    trial = trials[mouse.name][-1]
    own = checkpoint.fold_dir(work, "a", int(folds.trial_folds(mouse)[trial]))
    pred = np.load(result["directory"] / mouse.name / f"{trial}.npy")
    assert normwise(pred, direct_blend([own], mouse, trial)) < 1e-5
    targets = {m: [np.asarray(sim.mouse(m).load("responses", t)[:, : sim.mouse(m).lengths[t]])
                   for t in ts] for m, ts in trials.items()}
    want = competition_reference(_files(result["directory"], trials), targets)
    got = result["scores"].scores
    for m in trials:
        np.testing.assert_allclose(got.per_mouse[m], want[m], atol=1e-6)
    assert result["submission"] is None
    assert (work / "reports" / "a" / "folds" / "report.md").is_file()


def test_blend_is_the_mean_of_the_experiments(sim, work, predicted):
    result = experiment.blend_experiments(work, ["b", "a"], SPLIT)
    assert result["directory"] == experiment.predictions_dir(work, "a,b", SPLIT)
    trials = predicted["a"]["manifest"]["trials"]
    assert result["manifest"]["trials"] == trials
    a = _files(predicted["a"]["directory"], trials)
    b = _files(predicted["b"]["directory"], trials)
    mean = _files(result["directory"], trials)
    for m in trials:
        for x, y, z in zip(a[m], b[m], mean[m], strict=True):
            np.testing.assert_allclose(z, (x.astype(np.float64) + y) / 2, rtol=1e-6)
    rows = pq.read_table(result["submission"]).to_pylist()
    mouse = sim.mouse(rows[-1]["mouse"])
    trial = rows[-1]["trial_indices"]
    expected = mean[mouse.name][trials[mouse.name].index(trial)] * submission.precision(
        mouse.response_std())[:, : mouse.lengths[trial]]
    np.testing.assert_allclose(np.array(rows[-1]["prediction"]),
                               expected[:, 50: min(mouse.lengths[trial], 300) - 1], rtol=1e-6)
    assert (work / "reports" / "a,b" / SPLIT / "report.md").is_file()
    with pytest.raises(experiment.PredictionError,
                       match="python -m dwise_jax.predict --experiment c --split live_test_main"):
        experiment.blend_experiments(work, ["a", "c"], SPLIT)
    # b's out-of-fold predictions of no trials (as if made with other folds).
    atomic.write_json(experiment.predictions_dir(work, "b", "folds") / experiment.MANIFEST,
                      {**predicted["folds"]["manifest"], "trials": {}})
    with pytest.raises(experiment.PredictionError, match="predicts other trials"):
        experiment.blend_experiments(work, ["a", "b"], "folds")


# --------------------------------------------------------------------------- errors


def test_an_unfinished_fold_is_named_in_a_warning(sim, tmp_path, capsys):
    directory = random_fold(tmp_path, "e", 3, sim, 0)  # its model.json: a run of 9 steps
    experiment.load_fold(directory, 3)
    assert "has not finished" not in capsys.readouterr().err  # saved at step 9
    kwargs = model_kwargs(sim.num_neurons, **TEST_MODEL)
    model = DwiseNeuro(**kwargs, rngs=nnx.Rngs(0))
    save_fold(tmp_path, "e", 4, kwargs, sim.names,
              nnx.state(model, (nnx.Param, nnx.BatchStat)), sim.root, step=5)
    experiment.load_fold(checkpoint.fold_dir(tmp_path, "e", 4), 4)
    assert "warning: fold 4 checkpoint is at step 5 of 9: its training has not finished" in \
        capsys.readouterr().err


def test_clear_errors(sim, work, oof_folds):
    missing = next(k for k in range(7) if k not in oof_folds)
    with pytest.raises(experiment.PredictionError, match=f"fold_{missing}.*no checkpoint"):
        predict.predict_split(work, "a", SPLIT, fold_ids=[oof_folds[0], missing])
    with pytest.raises(experiment.PredictionError, match="no fold folders"):
        predict.predict_split(work, "nothing", SPLIT)
    with pytest.raises(experiment.PredictionError, match="unknown split 'oracle'"):
        predict.predict_split(work, "a", "oracle")
    with pytest.raises(experiment.PredictionError, match="anchor strides must be in 1..30"):
        predict.predict_split(work, "a", SPLIT, anchor_stride=31)
    counts = [n + 1 for n in sim.num_neurons]
    random_fold(work, "wrong_neurons", 0, sim, 0, neurons=counts)
    with pytest.raises(experiment.PredictionError,
                       match=r"readout 0 .* has 7 neurons but .*lists 6"):
        predict.predict_split(work, "wrong_neurons", SPLIT)
    random_fold(work, "wrong_mice", 0, sim, 0, mice=["x", "y"])
    with pytest.raises(experiment.PredictionError, match="has no readout for mouse"):
        predict.predict_split(work, "wrong_mice", SPLIT)


def test_command_line_errors_are_one_line(work, capsys, monkeypatch):
    for args, message in (
            (["--experiment=a", "--split=oracle"], "unknown split 'oracle'"),
            (["--experiment=a,c", f"--split={SPLIT}", "--blend_only"], "make them with")):
        assert call_command("predict", [*args, f"--workdir={work}"], monkeypatch) == 1
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_predict_with_only_a_split_blends_every_experiment(sim, work, predicted, tmp_path):
    """`python -m dwise_jax.predict --split S`, as the project's brief writes it: every
    experiment of the workdir, each one's folds blended, then their mean (named 'a,b')."""
    for name in ("a", "b"):
        os.symlink(work / name, tmp_path / name)
    (tmp_path / "notes").mkdir()  # a folder without folds is no experiment
    out = subprocess.run([sys.executable, "-m", "dwise_jax.predict", f"--split={SPLIT}",
                          f"--workdir={tmp_path}", "--stride_sweep="],
                         capture_output=True, text=True, cwd=REPO, timeout=HANG_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    mean_dir = experiment.predictions_dir(tmp_path, "a,b", SPLIT)
    manifest = json.loads((mean_dir / "manifest.json").read_text())
    assert manifest["experiments"] == ["a", "b"]
    mouse = sim.mice[0]
    trial = manifest["trials"][mouse.name][0]
    own = [np.load(predicted[e]["directory"] / mouse.name / f"{trial}.npy") for e in ("a", "b")]
    got = np.load(mean_dir / mouse.name / f"{trial}.npy")
    np.testing.assert_allclose(got, (own[0].astype(np.float64) + own[1]) / 2, atol=1e-5)
    assert (tmp_path / "predictions" / "a,b" / SPLIT).is_dir()
    with pytest.raises(experiment.PredictionError, match="holds no trained experiment"):
        experiment.experiments_in(tmp_path / "notes")
