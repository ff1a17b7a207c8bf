"""Data that contradicts its own statistics (issue 16): `python -m dwise_jax.data.sensorium ROOT
--check` names every trial file holding a value far outside the mouse's meta/statistics, and
training stops at the first such window with one line naming the file and trial, before any
step. Every dataset the simulator makes passes.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    FOLD,
    call_command,
    detach,
    link_copy,
    mouse_folder,
    q,
    train_args,
)

from dwise_jax import checkpoint
from dwise_jax.data import folds, synthetic, value_check, windows
from dwise_jax.data.sensorium import DatasetError, SensoriumDataset
from dwise_jax.data.window_reader import load_window


@pytest.fixture
def root(sim_root, tmp_path) -> Path:
    return link_copy(sim_root, tmp_path / "root")


def scale(path: Path, factor: float) -> np.ndarray:
    array = np.load(detach(path)) * factor
    np.save(path, array)
    return array


def set_value(path: Path, index, value: float) -> None:
    array = np.load(detach(path))
    array[index] = value
    np.save(path, array)


def train_trial(mouse, fold: int = FOLD) -> int:
    """A labeled trial outside validation fold `fold`: one that training reads."""
    trial_folds = folds.trial_folds(mouse)
    return int(next(t for t in range(mouse.num_trials)
                    if mouse.is_labeled(t) and trial_folds[t] != fold))


# ----------------------------------------------------------------------------- what passes
@pytest.mark.parametrize("seed, size", [
    (0, dict(mice=2, neurons=6, trials=20, frames=40)),
    (1, dict(mice=1, neurons=40, trials=30, frames=120)),
    (7, dict(mice=3, neurons=2, trials=25, frames=60)),
])
def test_every_simulated_dataset_passes(tmp_path, capsys, seed, size):
    root = synthetic.generate(tmp_path / "root", seed=seed, **size)
    assert value_check.main([str(root), "--check"]) == 0
    out = capsys.readouterr()
    assert "all valid, every value within its statistics" in out.out and out.err == ""
    # With a wide margin: no value comes within a tenth of the allowed distance.
    for mouse in SensoriumDataset.open(root).mice:
        for modality, b in value_check.mouse_bounds(mouse).items():
            tighter = value_check.Bounds(**{**b.__dict__,
                                            "low": b.recorded_low - b.span,
                                            "high": b.recorded_high + b.span})
            mouse.__dict__["_value_bounds"] = {modality: tighter}
            for trial in range(mouse.num_trials):
                assert value_check.scan_trial(mouse, trial) == [], (modality, trial)
            del mouse.__dict__["_value_bounds"]


def test_the_shared_simulated_root_passes(sim_root):
    offenses: list[str] = []
    assert value_check.check_all(SensoriumDataset.open(sim_root), offenses) == 3 * 40
    assert offenses == []


def test_bounds_keep_the_real_datas_ranges(root):
    # Statistics shaped and ranged as the real data's: grey levels 0..255, non-negative
    # responses with one silent neuron (it never fired in the recorded trials), pupil dilation
    # and running speed, pupil position in camera pixels.
    m = mouse_folder(root)
    stats = m / "meta" / "statistics"
    frames = np.load(stats / "responses" / "all" / "max.npy").shape[-1]
    per_frame = {  # (statistic, values per channel); every frame position records the same
        "videos": {"min": np.zeros((36, 64)), "max": np.full((36, 64), 255.0)},
        "behavior": {"min": [0.0, -3.0], "max": [58.0, 41.0]},
        "pupil_center": {"min": [110.0, 60.0], "max": [330.0, 230.0]},
        "responses": {"min": np.zeros(12), "max": np.linspace(0.0, 900.0, 12)},  # 0 silent
    }
    for modality, values in per_frame.items():
        for name, value in values.items():
            value = np.asarray(value, np.float32)[..., None]
            np.save(detach(stats / modality / "all" / f"{name}.npy"),
                    np.repeat(value, frames, axis=-1))
    mouse = SensoriumDataset.open(root).mouse(m.name)
    bounds = value_check.mouse_bounds(mouse)
    assert bounds["videos"].low.shape == (1,) and bounds["responses"].low.shape == (12,)
    frame_idx = windows.window_indexes(40)
    ok_frames = np.full((16, 36, 64), 255.0, np.float32)
    ok_frames[0] = 0.0
    ok_traces = np.array([[58.0, -3.0, 330.0, 60.0]] * 16, np.float32)
    ok_target = np.zeros((16, 12), np.float32)
    ok_target[3, 0] = 900.0  # the silent neuron's event as large as the largest neuron's max
    ok_target[4, 11] = 900.0 * 3
    value_check.check_window(bounds, mouse, 0, frame_idx, ok_frames, ok_traces, ok_target)
    value_check.check_window(bounds, mouse, 0, frame_idx, ok_frames, ok_traces, None)
    bad_target = ok_target.copy()
    bad_target[2, 5] = 1e6
    with pytest.raises(DatasetError, match=r"neuron 5, frame 14 of trial 0"):
        value_check.check_window(bounds, mouse, 0, frame_idx, ok_frames, ok_traces, bad_target)


# ----------------------------------------------------------------------------- --check
def test_check_names_every_offending_file_value_and_statistic(root, capsys):
    m = mouse_folder(root)
    mouse = SensoriumDataset.open(root).mouse(m.name)
    trial = train_trial(mouse)
    other = next(t for t in range(mouse.num_trials) if t != trial)
    scaled = mouse.path_of("responses", trial)
    scale(scaled, 1e6)
    stat_max = np.load(m / "meta" / "statistics" / "behavior" / "all" / "max.npy")
    stat_max = stat_max.astype(np.float64)
    stat_min = np.load(m / "meta" / "statistics" / "behavior" / "all" / "min.npy")
    stat_min = stat_min.astype(np.float64)
    span = np.nanmax(stat_max) - np.nanmin(stat_min)
    behavior = mouse.path_of("behavior", other)
    set_value(behavior, (1, 7), 2e5)  # running speed, frame 7
    assert value_check.main([str(root), "--check"]) == 1
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 2, out.err
    responses_stat = m / "meta" / "statistics" / "responses" / "all" / "max.npy"
    pattern = (rf"error: {q(scaled)}: holds [0-9.e+]+ at neuron \d+, frame \d+, which "
               rf"contradicts the dataset's own statistics: {q(responses_stat)} records at most "
               rf"[0-9.e+]+ for neuron \d+ \(allowed up to [0-9.e+]+: that maximum plus 10 x "
               rf"[0-9.e+]+, the whole recorded range of responses\)")
    behavior_line = (
        f"error: {behavior}: holds 2e+05 at row 1 (running speed), frame 7, which contradicts "
        f"the dataset's own statistics: {m}/meta/statistics/behavior/all/max.npy records at most "
        f"{np.nanmax(stat_max[1]):.4g} for row 1 (running speed) (allowed up to "
        f"{np.nanmax(stat_max[1]) + 10 * span:.4g}: that maximum plus 10 x {span:.4g}, the "
        "whole recorded range of behavior)")
    by_file = {line.split(": ")[1]: line for line in lines}
    assert re.fullmatch(pattern, by_file[str(scaled)]), by_file[str(scaled)]
    assert by_file[str(behavior)] == behavior_line
    assert "2 trial files hold values that contradict the dataset's own statistics" in out.out


def test_check_reads_mean_and_std_without_min_and_max_and_skips_a_modality_without_any(
        root, capsys):
    m = mouse_folder(root)
    stats = m / "meta" / "statistics"
    for name in ("min", "max"):
        (stats / "pupil_center" / "all" / f"{name}.npy").unlink()
    for name in ("min", "max", "mean", "std"):
        (stats / "videos" / "all" / f"{name}.npy").unlink()
    mouse = SensoriumDataset.open(root).mouse(m.name)
    bounds = value_check.mouse_bounds(mouse)
    assert "videos" not in bounds and not bounds["pupil_center"].from_range
    assert value_check.main([str(root), "--check"]) == 0  # still plausible from mean +- 10 std
    capsys.readouterr()
    scale(mouse.path_of("videos", 0), 1e6)  # no statistics: not held to any
    path = mouse.path_of("pupil_center", 1)
    set_value(path, (0, 3), -1e7)
    assert value_check.main([str(root), "--check"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {path}: holds -1e+07 at row 0 (horizontal), frame 3, which "
                           f"contradicts the dataset's own statistics: {stats}/pupil_center/all/"
                           "mean.npy and std.npy put row 0 (horizontal) within [")
    assert "(mean +- 10 std) (allowed down to " in line


# ----------------------------------------------------------------------------- training
def test_the_loader_names_the_file_trial_and_frame(root):
    mouse = SensoriumDataset.open(root).mice[0]
    trial = train_trial(mouse)
    path = mouse.path_of("pupil_center", trial)
    set_value(path, (1, 50), 5e4)
    load_window(mouse, trial, 49)  # frame 50 is not in the windows of odd anchors
    with pytest.raises(DatasetError) as err:
        load_window(mouse, trial, 60)
    assert str(err.value).startswith(
        f"{path}: holds 5e+04 at row 1 (vertical), frame 50 of trial {trial}, which contradicts "
        f"the dataset's own statistics: {mouse.path}/meta/statistics/pupil_center/all/max.npy "
        "records at most ")


def test_training_stops_at_the_first_offending_window_before_any_step(root, tmp_path, capsys,
                                                                      monkeypatch):
    # Every training trial of one mouse scaled by 1e6: the first batch holds one.
    mouse = SensoriumDataset.open(root).mice[1]
    trial_folds = folds.trial_folds(mouse)
    for t in range(mouse.num_trials):
        if mouse.is_labeled(t) and trial_folds[t] != FOLD:
            scale(mouse.path_of("responses", t), 1e6)
    workdir = tmp_path / "work"
    status = call_command("train", train_args(root, workdir), monkeypatch)
    err = capsys.readouterr().err
    assert status == 1, err[-3000:]
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    folder = re.escape(str(mouse.path / "data" / "responses"))
    pattern = (rf"error: {folder}/(\d+)\.npy: holds [0-9.e+]+ at neuron \d+, frame \d+ of "
               rf"trial \1, which contradicts the dataset's own statistics: .*")
    assert re.fullmatch(pattern, last), err[-3000:]
    fold = checkpoint.fold_dir(workdir, "demo", FOLD)
    assert checkpoint.latest_step(fold) is None  # no state of a step was saved
    metrics = (fold / "metrics.jsonl").read_text() if (fold / "metrics.jsonl").exists() else ""
    assert '"train"' not in metrics  # the error came before the first step
    assert not (fold / "train.lock").exists()
