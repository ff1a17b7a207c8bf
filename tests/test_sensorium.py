"""The on-disk layer: reading the simulated and the fixture's fake dataset, mouse order,
labeled tiers, dummy-label detection and one test per kind of malformed data."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from dwise_jax.data import sensorium as S
from dwise_jax.data import value_check
from dwise_jax.data.sensorium import DatasetError, DummyLabelsWarning, SensoriumDataset

UNKNOWN = "dynamic12345-1-1-Video-" + "ab" * 16


def plain_length(row: np.ndarray) -> int:
    """The first-NaN rule, written independently of the code under test."""
    nan = np.flatnonzero(np.isnan(row))
    return int(nan[0]) if nan.size else len(row)


def write_mouse(root: Path, name: str, tiers, lengths, *, neurons: int = 3, frames: int = 8,
                labeled=("train", "oracle", "none"), dummy_tail: bool = True, seed: int = 0):
    """A tiny mouse folder in the real layout; tiers outside `labeled` hold dummy zeros."""
    rng = np.random.default_rng(seed)
    folder = root / name
    for d in S.MODALITIES:
        (folder / "data" / d).mkdir(parents=True)
    for t, (tier, length) in enumerate(zip(tiers, lengths, strict=True)):
        tail = np.arange(frames) >= length
        arrays = {"videos": rng.uniform(0, 255, (36, 64, frames)),
                  "responses": rng.gamma(1.0, 1.0, (neurons, frames)) + 0.01,
                  "behavior": rng.normal(10, 2, (2, frames)),
                  "pupil_center": rng.normal(200, 5, (2, frames))}
        for value in arrays.values():
            value[..., tail] = np.nan
        if tier not in labeled:
            arrays["responses"] = np.zeros((neurons, frames))
            if dummy_tail:
                arrays["responses"][:, tail] = np.nan
        for key, value in arrays.items():
            np.save(folder / "data" / key / f"{t}.npy", value.astype(np.float32))
    (folder / "meta" / "trials").mkdir(parents=True)
    np.save(folder / "meta" / "trials" / "tiers.npy", np.array(tiers))
    (folder / "meta" / "neurons").mkdir(parents=True)
    np.save(folder / "meta" / "neurons" / "unit_ids.npy", np.arange(neurons, dtype=np.int64) + 7)
    np.save(folder / "meta" / "neurons" / "cell_motor_coordinates.npy", np.zeros((neurons, 3)))
    stats = folder / "meta" / "statistics" / "responses" / "all"
    stats.mkdir(parents=True)
    np.save(stats / "std.npy", np.ones((neurons, frames), np.float32))
    return folder


# ----------------------------------------------------------------------------- reading
def test_simulated_root_shapes_dtypes_order(sim_root):
    ds = SensoriumDataset.open(sim_root)
    assert ds.names == sorted(ds.names) and len(ds.mice) == 3
    assert [m.index for m in ds.mice] == [0, 1, 2] and ds.num_neurons == [12, 12, 12]
    assert ds.mouse(ds.names[1]) is ds.mice[1] and ds.mouse(2) is ds.mice[2]
    # A command line's mouse: its name, its readout index, or a unique prefix of its name.
    assert ds.find(ds.names[1]) is ds.find("1") is ds.find(ds.names[1][:12]) is ds.mice[1]
    for key, problem in (("dynamic", "more than one"), ("3", "no"), ("nobody", "no")):
        with pytest.raises(KeyError, match=f"{problem} mouse is '{key}'"):
            ds.find(key)
    for mouse in ds.mice:
        assert not mouse.is_real_old and mouse.submitted
        assert mouse.labeled_tiers == {"train", "oracle"}
        assert set(mouse.tiers) == set(S.TIERS) and mouse.num_trials == 40
        assert mouse.unit_ids.dtype == np.int64 and mouse.cell_coordinates.shape == (12, 3)
        trial_id = int(mouse.trial_ids("train")[0])
        video = mouse.load("videos", trial_id)
        assert isinstance(video, np.memmap) and video.dtype == np.float32
        trial = mouse.load_trial(trial_id)
        t = video.shape[-1]
        assert trial.video.shape == (36, 64, t) and trial.responses.shape == (12, t)
        assert trial.behavior.shape == trial.pupil_center.shape == (2, t)
        assert mouse.response_std().shape == (12, t) and mouse.response_std().dtype == np.float32
        test_id = int(mouse.trial_ids(S.TEST_TIERS)[0])
        assert not mouse.is_labeled(test_id) and mouse.load_trial(test_id).responses is None
    assert "dynamic90001" in ds.summary() and "train,oracle" in ds.summary()


def test_lengths_follow_first_nan_rule(sim_root):
    ds = SensoriumDataset.open(sim_root)
    for mouse in ds.mice:
        expected = []
        for t, tier in enumerate(mouse.tiers):
            source = "responses" if tier in ("train", "oracle") else "behavior"
            row = np.load(mouse.path / "data" / source / f"{t}.npy")[0]
            expected.append(plain_length(row))
            video = np.load(mouse.path / "data" / "videos" / f"{t}.npy")
            assert plain_length(video[0, 0]) == expected[-1]  # the video ends where the rest do
        np.testing.assert_array_equal(mouse.lengths, expected)
        assert len(set(expected)) > 3 and min(expected) >= 31


def test_trial_ids_select_tiers(sim_root):
    mouse = SensoriumDataset.open(sim_root).mice[0]
    ids = mouse.trial_ids(["oracle", "none"])
    np.testing.assert_array_equal(ids, np.flatnonzero((mouse.tiers == "oracle")
                                                      | (mouse.tiers == "none")))
    np.testing.assert_array_equal(mouse.trial_ids("none"), np.flatnonzero(mouse.tiers == "none"))
    with pytest.raises(ValueError, match="fold_0"):
        mouse.trial_ids(["fold_0"])


def test_pipeline_fixture_fake_dataset(tmp_path, pipeline_fixture):
    f, meta = pipeline_fixture
    fake, rng = meta["fake_dataset"], np.random.default_rng(1)
    for m, name in enumerate(fake["mice"]):
        folder, p = tmp_path / name, f"fake/mouse{m}/"
        frames, tiers = f[p + "std"].shape[1], f[p + "tiers"]
        for d in S.MODALITIES:
            (folder / "data" / d).mkdir(parents=True)
        for t, (tier, k) in enumerate(zip(tiers, f[p + "video_index"], strict=True)):
            clip = f[f"phash/video/{k:02d}"][..., : f["phash/length"][k]]
            video = np.full((36, 64, frames), np.nan, np.float32)
            video[..., : clip.shape[-1]] = clip
            side = rng.normal(10, 2, (2, 2, frames)).astype(np.float32)
            side[..., clip.shape[-1]:] = np.nan
            labeled = tier in ("train", "oracle")
            responses = (f[f"{p}responses/{t}"] if labeled
                         else np.zeros((len(f[p + "unit_ids"]), frames), np.float32))
            for key, value in zip(S.MODALITIES, (video, responses, side[0], side[1]), strict=True):
                np.save(folder / "data" / key / f"{t}.npy", value)
        coords = np.zeros((len(f[p + "unit_ids"]), 3))
        for sub, value in (("trials/tiers", tiers), ("neurons/unit_ids", f[p + "unit_ids"]),
                           ("neurons/cell_motor_coordinates", coords),
                           ("statistics/responses/all/std", f[p + "std"])):
            (folder / "meta" / sub).parent.mkdir(parents=True, exist_ok=True)
            np.save(folder / "meta" / f"{sub}.npy", value)
    ds = SensoriumDataset.open(tmp_path)
    assert ds.names == fake["mice"] == list(S.NEW_MICE)
    for m, mouse in enumerate(ds.mice):
        p = f"fake/mouse{m}/"
        np.testing.assert_array_equal(mouse.tiers, f[p + "tiers"])
        np.testing.assert_array_equal(mouse.lengths, f[p + "length"])
        np.testing.assert_array_equal(mouse.unit_ids, f[p + "unit_ids"])
        np.testing.assert_array_equal(mouse.response_std(), f[p + "std"])
        assert mouse.submitted and mouse.labeled_tiers == {"train", "oracle"}
        for t in range(mouse.num_trials):
            trial = mouse.load_trial(t)
            if mouse.is_labeled(t):
                np.testing.assert_array_equal(trial.responses, f[f"{p}responses/{t}"])
            else:
                assert trial.responses is None


# ----------------------------------------------------------------------------- mouse order
def test_all_ten_real_mice_order_and_counts(tmp_path):
    for i, (name, count) in enumerate(reversed(S.REAL_MICE)):
        write_mouse(tmp_path, name, ["train", "none"], [5, 6], neurons=count, frames=6, seed=i)
    ds = SensoriumDataset.open(tmp_path)
    assert ds.names == [n for n, _ in S.REAL_MICE] and sum(ds.num_neurons) == 78853
    assert [m.is_real_old for m in ds.mice] == [False] * 5 + [True] * 5
    assert ds.mice[0].lengths.tolist() == [5, 6]
    bad = S.REAL_MICE[7][0]
    shutil.rmtree(tmp_path / bad)
    write_mouse(tmp_path, bad, ["train"], [6], neurons=S.REAL_MICE[7][1] + 1, frames=6)
    with pytest.raises(DatasetError) as err:
        SensoriumDataset.open(tmp_path)
    assert str(tmp_path / bad / "meta" / "neurons" / "unit_ids.npy") in str(err.value)
    assert "8286" in str(err.value) and "8285" in str(err.value)


def test_mixed_real_and_unknown_mice_order(tmp_path):
    other = "dynamic1-1-1-Video-" + "0" * 32
    names = [S.REAL_MICE[9][0], UNKNOWN, S.REAL_MICE[3][0], other, S.REAL_MICE[5][0],
             S.REAL_MICE[0][0]]
    for name in names:  # neuron counts differ from the real ones: fine for a partial root
        write_mouse(tmp_path, name, ["train", "oracle"], [8, 7])
    (tmp_path / "simulation").mkdir()  # not a mouse name: ignored
    (tmp_path / "notes.txt").write_text("x")
    ds = SensoriumDataset.open(tmp_path)
    assert ds.names == [S.REAL_MICE[0][0], S.REAL_MICE[3][0], other, UNKNOWN,
                        S.REAL_MICE[5][0], S.REAL_MICE[9][0]]
    assert [m.submitted for m in ds.mice] == [True, True, True, True, False, False]
    assert [m.index for m in ds.mice] == list(range(6))


# ----------------------------------------------------------------------------- labels
def test_old_mouse_dummy_test_labels_warn_and_count_unlabeled(tmp_path):
    tiers = ["train", "live_test_main", "live_test_main", "final_test_bonus", "oracle"]
    dummy, real = S.OLD_MICE[0], S.OLD_MICE[3]
    write_mouse(tmp_path, dummy, tiers, [8, 6, 5, 7, 8], labeled=("train", "oracle"),
                dummy_tail=False)
    write_mouse(tmp_path, real, tiers, [8, 6, 5, 7, 8], labeled=tuple(S.TIERS))
    with pytest.warns(DummyLabelsWarning) as record:
        ds = SensoriumDataset.open(tmp_path)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2 and all(m.startswith(dummy) for m in messages)
    assert "final_test_bonus" in messages[0] and "live_test_main" in messages[1]
    mouse = ds.mouse(dummy)
    assert mouse.labeled_tiers == {"train", "oracle"} and not mouse.is_labeled(1)
    # Dummy zeros have no NaN tail here: the length must come from behavior row 0.
    assert mouse.lengths.tolist() == [8, 6, 5, 7, 8]
    assert mouse.load_trial(1).responses is None
    good = ds.mouse(real)
    # Only the test tiers present with real labels count (two of the four here).
    assert good.labeled_tiers == {"train", "oracle", "live_test_main", "final_test_bonus"}
    assert good.is_labeled(3) and good.lengths.tolist() == [8, 6, 5, 7, 8]
    assert good.load_trial(3).responses.shape == (3, 8)


def test_new_mouse_test_tiers_never_labeled(tmp_path):
    write_mouse(tmp_path, S.NEW_MICE[2], ["train", "final_test_main"], [8, 8],
                labeled=tuple(S.TIERS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mouse = SensoriumDataset.open(tmp_path).mice[0]
    assert mouse.labeled_tiers == {"train", "oracle"} and not mouse.is_labeled(1)


def test_old_mouse_partly_downloaded_labels_is_an_error(tmp_path):
    folder = write_mouse(tmp_path, S.OLD_MICE[1], ["live_test_bonus"] * 3, [8, 8, 8],
                         labeled=tuple(S.TIERS))
    np.save(folder / "data" / "responses" / "2.npy", np.zeros((3, 8), np.float32))
    with pytest.raises(DatasetError, match="incomplete label download") as err:
        SensoriumDataset.open(tmp_path)
    assert str(folder / "data" / "responses" / "2.npy") in str(err.value)


# ----------------------------------------------------------------------------- malformed data
@pytest.fixture
def small(tmp_path) -> Path:
    return write_mouse(tmp_path, UNKNOWN, ["train", "oracle", "live_test_main"], [8, 6, 7])


def expect_error(call, path: Path, *words: str) -> str:
    with pytest.raises(DatasetError) as err:
        call()
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def test_missing_mouse_data_folder(small):
    shutil.rmtree(small / "data")
    expect_error(lambda: SensoriumDataset.open(small.parent), small / "data", "missing")


def test_missing_trial_file(small):
    path = small / "data" / "pupil_center" / "1.npy"
    path.unlink()
    expect_error(lambda: SensoriumDataset.open(small.parent), path, "missing")


def test_missing_root_and_empty_root(tmp_path):
    expect_error(lambda: SensoriumDataset.open(tmp_path / "nope"), tmp_path / "nope", "missing")
    expect_error(lambda: SensoriumDataset.open(tmp_path), tmp_path, "no mouse folder")


def test_wrong_number_of_dimensions(small):
    path = small / "data" / "videos" / "1.npy"
    np.save(path, np.zeros((36 * 64, 8), np.float32))
    mouse = SensoriumDataset.open(small.parent).mice[0]
    expect_error(lambda: mouse.load_trial(1), path, "2 dimensions", "expected 3")
    path = small / "data" / "behavior" / "0.npy"
    np.save(path, np.zeros((2, 1, 8), np.float32))
    expect_error(lambda: SensoriumDataset.open(small.parent), path, "3 dimensions")


def test_modalities_of_a_trial_with_different_lengths(small):
    mouse = SensoriumDataset.open(small.parent).mice[0]
    path = small / "data" / "pupil_center" / "0.npy"
    np.save(path, np.zeros((2, 10), np.float32))
    expect_error(lambda: mouse.load_trial(0), path, "10 frames", "video has 8")
    tail = np.load(small / "data" / "behavior" / "1.npy")
    tail[:, 5:] = np.nan  # the trial is 6 frames long; this behavior stops at 5
    np.save(small / "data" / "behavior" / "1.npy", tail)
    expect_error(lambda: mouse.load_trial(1), small / "data" / "behavior" / "1.npy",
                 "5 frames long", "6 frames long")


def test_unknown_tier_string(small):
    path = small / "meta" / "trials" / "tiers.npy"
    np.save(path, np.array(["train", "validation", "none"]))
    expect_error(lambda: SensoriumDataset.open(small.parent), path, "unknown tier", "validation")


def test_nan_inside_a_trial(small):
    path = small / "data" / "responses" / "0.npy"
    responses = np.load(path)
    responses[2, 3] = np.nan  # neuron 2, not neuron 0: the length rule does not see it
    np.save(path, responses)
    mouse = SensoriumDataset.open(small.parent).mice[0]
    assert mouse.lengths[0] == 8
    expect_error(lambda: mouse.load_trial(0), path, "NaN inside the trial at frame 3")
    path = small / "data" / "videos" / "1.npy"
    video = np.load(path)
    video[..., 6:] = 5.0  # values where the tail must be NaN
    video[0, 0, 6:] = np.nan
    np.save(path, video)
    expect_error(lambda: mouse.load_trial(1), path, "after the NaN tail")


def test_pickled_object_arrays(small):
    path = small / "meta" / "trials" / "tiers.npy"
    np.save(path, np.array(["train", "oracle", "none"], dtype=object), allow_pickle=True)
    expect_error(lambda: SensoriumDataset.open(small.parent), path, "pickled object array")
    np.save(path, np.array(["train", "oracle", "none"]))
    trial = small / "data" / "videos" / "2.npy"
    np.save(trial, np.array([np.zeros(3), "x"], dtype=object), allow_pickle=True)
    mouse = SensoriumDataset.open(small.parent).mice[0]
    expect_error(lambda: mouse.load("videos", 2), trial, "pickled object array")


def test_std_of_wrong_shape(small):
    path = small / "meta" / "statistics" / "responses" / "all" / "std.npy"
    mouse = SensoriumDataset.open(small.parent).mice[0]
    np.save(path, np.ones((4, 8), np.float32))
    expect_error(mouse.response_std, path, "4 neurons", "lists 3")
    np.save(path, np.ones(3, np.float32))
    expect_error(mouse.response_std, path, "1 dimensions")


def test_cli_summary_check_and_error(small, capsys):
    assert value_check.main([str(small.parent), "--check"]) == 0
    out = capsys.readouterr().out
    assert UNKNOWN in out and "checked 3 trials" in out
    (small / "data" / "videos" / "2.npy").unlink()
    result = subprocess.run([sys.executable, "-m", "dwise_jax.data.sensorium", str(small.parent)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {small / 'data' / 'videos' / '2.npy'}: file is " \
        "missing (1 trial files of 3 missing in this folder)"
