"""The simulated dataset: layout, tiers, shared clips, kept-aside truth, noise ceiling,
learnability and determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dwise_jax import cli
from dwise_jax.data import synthetic
from dwise_jax.data.sensorium import MOUSE_NAME_PATTERN, REAL_MICE, TEST_TIERS, TIERS


def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row Pearson r (population std), as the competition metric computes it."""
    a = (a - a.mean(-1, keepdims=True)) / (a.std(-1, keepdims=True) + 1e-8)
    b = (b - b.mean(-1, keepdims=True)) / (b.std(-1, keepdims=True) + 1e-8)
    return (a * b).mean(-1)


def load(root: Path, name: str, modality: str, trial: int) -> np.ndarray:
    return np.load(root / name / "data" / modality / f"{trial}.npy")


def first_nan(row: np.ndarray) -> int:
    nan = np.flatnonzero(np.isnan(row))
    return int(nan[0]) if nan.size else len(row)


@pytest.fixture(scope="module")
def info(sim_root):
    return synthetic.load_info(sim_root)


def test_files_shapes_dtypes_and_nan_tails(sim_root, info):
    names = [m["name"] for m in info["mouse_info"]]
    found = sorted(p.name for p in sim_root.iterdir() if MOUSE_NAME_PATTERN.fullmatch(p.name))
    assert found == sorted(names) and (sim_root / "simulation").is_dir()
    assert not set(names) & {n for n, _ in REAL_MICE}
    for m in info["mouse_info"]:
        folder, t_array = sim_root / m["name"], m["array_length"]
        tiers = np.load(folder / "meta" / "trials" / "tiers.npy")
        assert tiers.dtype.kind == "U" and set(tiers) == set(TIERS)
        assert np.load(folder / "meta" / "neurons" / "unit_ids.npy").dtype == np.int64
        std = np.load(folder / "meta" / "statistics" / "responses" / "all" / "std.npy")
        assert std.shape == (12, t_array) and std.dtype == np.float32
        for t, length in enumerate(m["clip_lengths"]):
            arrays = {k: load(sim_root, m["name"], k, t)
                      for k in ("videos", "responses", "behavior", "pupil_center")}
            assert arrays["videos"].shape == (36, 64, t_array)
            assert arrays["responses"].shape == (12, t_array)
            for value in arrays.values():
                assert value.dtype == np.float32
                assert np.isnan(value[..., length:]).all()
                assert not np.isnan(value[..., :length]).any()
            video = arrays["videos"][..., :length]
            assert video.min() >= 0 and video.max() <= 255 and np.array_equal(video, np.rint(video))
        lengths = np.array(m["clip_lengths"])
        assert lengths.min() >= 72 and (lengths < 90).any() and (lengths > 90).any()


def test_tiers_repeats_and_shared_clips(sim_root, info):
    mice = info["mouse_info"]
    for m in mice:
        tiers = np.load(sim_root / m["name"] / "meta" / "trials" / "tiers.npy")
        assert {t: int((tiers == t).sum()) for t in TIERS} == m["tiers"]
        keys = np.array(m["video_keys"])
        oracle = keys[tiers == "oracle"]
        assert len(set(oracle)) >= 2 and all((oracle == k).sum() >= 2 for k in set(oracle))
        for key in set(oracle):
            ids = np.flatnonzero(keys == key)
            first = load(sim_root, m["name"], "videos", ids[0])
            for t in ids[1:]:  # repeats are exact copies; the behaviour is not
                assert np.array_equal(load(sim_root, m["name"], "videos", t), first, equal_nan=True)
                assert not np.array_equal(load(sim_root, m["name"], "behavior", t),
                                          load(sim_root, m["name"], "behavior", ids[0]),
                                          equal_nan=True)
    # The same clips reach every mouse: oracle, test and part of train; arrays differ in T only.
    shared = set.intersection(*(set(m["video_keys"]) for m in mice))
    assert any(k.startswith("shared_train") for k in shared)
    assert {k.split("/")[0] for k in shared} >= {"oracle", *TEST_TIERS}
    key = next(k for k in shared if k.startswith("shared_train"))
    clips = [load(sim_root, m["name"], "videos", m["video_keys"].index(key)) for m in mice]
    length = first_nan(clips[0][0, 0])
    assert len({c.shape[-1] for c in clips}) > 1
    assert all(np.array_equal(c[..., :length], clips[0][..., :length]) for c in clips)


def test_test_tiers_hold_dummy_zeros_and_truth_is_kept_aside(sim_root, info):
    m = info["mouse_info"][1]
    tiers = np.array([k.split("/")[0] for k in m["video_keys"]])
    for t, tier in enumerate(np.load(sim_root / m["name"] / "meta" / "trials" / "tiers.npy")):
        public = load(sim_root, m["name"], "responses", t)
        truth = synthetic.load_truth(sim_root, m["name"], t)
        length = m["clip_lengths"][t]
        assert np.isnan(truth[:, length:]).all() and np.nanmin(truth) >= 0.0
        if tier in TEST_TIERS:
            assert tiers[t] == tier and np.all(public[:, :length] == 0)
            assert np.nanmax(truth) > 0 and np.nanmean(truth > 0.05) > 0.05
        else:
            np.testing.assert_array_equal(truth, public)


def test_noise_ceiling_matches_the_files(sim_root, info):
    ceiling = info["noise_ceiling"]
    assert 0.25 < ceiling["overall"]["main"] < 0.7 and 0.25 < ceiling["overall"]["all"] < 0.8
    for m in info["mouse_info"]:
        tiers = np.load(sim_root / m["name"] / "meta" / "trials" / "tiers.npy")
        ids = np.flatnonzero(np.isin(tiers, TEST_TIERS))
        rate = np.concatenate([synthetic.load_truth(sim_root, m["name"], t, noiseless=True)
                               [:, : m["clip_lengths"][t]] for t in ids], 1)
        noisy = np.concatenate([synthetic.load_truth(sim_root, m["name"], t)
                                [:, : m["clip_lengths"][t]] for t in ids], 1)
        assert corr(rate, noisy).mean() == pytest.approx(ceiling["per_mouse"][m["name"]]["all"],
                                                         abs=2e-4)


def test_std_file_is_the_per_frame_std_of_labeled_trials(sim_root, info):
    m = info["mouse_info"][1]  # its arrays are longer than its longest clip
    tiers = np.load(sim_root / m["name"] / "meta" / "trials" / "tiers.npy")
    stack = np.stack([load(sim_root, m["name"], "responses", t)
                      for t in np.flatnonzero(np.isin(tiers, ["train", "oracle"]))])
    std = np.load(sim_root / m["name"] / "meta" / "statistics" / "responses" / "all" / "std.npy")
    valid = ~np.isnan(stack).all(0)
    assert (~valid).any()  # frames no labeled trial reaches are NaN, as in the real file
    np.testing.assert_allclose(std[valid], np.nanstd(stack[:, valid], 0), rtol=1e-4, atol=1e-6)
    assert np.isnan(std[~valid]).all()


def _lagged_features(video: np.ndarray, length: int) -> np.ndarray:
    """Frames 4x4-averaged, in contrast units, at lags 2, 4, 6: a linear model's inputs."""
    v = video[..., :length].transpose(2, 0, 1).reshape(length, 9, 4, 16, 4).mean((2, 4))
    v = ((v - 128) / 64).reshape(length, -1)
    return np.concatenate([np.pad(v, ((lag, 0), (0, 0)))[:length] for lag in (2, 4, 6)], 1)


def test_learnable_linear_cells_but_not_trivially(sim_root, info):
    """Ridge regression on lagged frames predicts held-out (oracle) responses of the linear
    cells, and fails on the energy cells, which need a nonlinearity."""
    linear_r, energy_r = [], []
    for m in info["mouse_info"]:
        tiers = np.load(sim_root / m["name"] / "meta" / "trials" / "tiers.npy")
        data = {}
        for split, tier in (("fit", "train"), ("held_out", "oracle")):
            ids = np.flatnonzero(tiers == tier)
            data[split] = [np.concatenate(parts) for parts in zip(*[
                (_lagged_features(load(sim_root, m["name"], "videos", t), m["clip_lengths"][t]),
                 load(sim_root, m["name"], "responses", t)[:, : m["clip_lengths"][t]].T)
                for t in ids], strict=True)]
        (x, y), (xh, yh) = data["fit"], data["held_out"]
        mx, my = x.mean(0), y.mean(0)
        w = np.linalg.solve((x - mx).T @ (x - mx) + 100 * np.eye(x.shape[1]), (x - mx).T @ (y - my))
        r = corr(((xh - mx) @ w + my).T, yh.T)
        energy = np.array(m["cell_type"]) == "energy"
        assert 0 < energy.sum() < len(energy)
        linear_r.append(r[~energy])
        energy_r.append(r[energy])
    linear_r, energy_r = np.concatenate(linear_r), np.concatenate(energy_r)
    assert linear_r.mean() > 0.12 and (linear_r > 0).mean() > 0.6
    assert energy_r.mean() < linear_r.mean() - 0.1


def test_behaviour_ranges_and_gain(sim_root, info):
    m = info["mouse_info"][2]
    ids = range(len(m["clip_lengths"]))
    beh = np.concatenate([load(sim_root, m["name"], "behavior", t)[:, : m["clip_lengths"][t]]
                          for t in ids], 1)
    pupil = np.concatenate([load(sim_root, m["name"], "pupil_center", t)[:, : m["clip_lengths"][t]]
                            for t in ids], 1)
    rate = np.concatenate([synthetic.load_truth(sim_root, m["name"], t, noiseless=True)
                           [:, : m["clip_lengths"][t]] for t in ids], 1)
    assert 8 <= beh[0].min() and beh[0].max() <= 30 and -0.5 <= beh[1].min() and beh[1].max() <= 25
    assert 180 <= pupil[0].min() and pupil[0].max() <= 260 and 120 <= pupil[1].min()
    assert beh[1].max() > 5 and (beh[1] < 1).mean() > 0.1  # bouts of running and of rest
    assert corr(beh[0], beh[1]) > 0.3  # arousal: the pupil dilates when running
    assert corr(rate.mean(0), beh[1]) > 0.2  # running raises the gain


def test_retinotopy_and_bonus_statistics(sim_root, info):
    m = info["mouse_info"][0]
    coords = np.load(sim_root / m["name"] / "meta" / "neurons" / "cell_motor_coordinates.npy")
    assert coords.shape == (12, 3)
    assert corr(coords[:, 0], np.array(m["receptive_fields"]["center_x"])) > 0.7
    assert corr(coords[:, 1], np.array(m["receptive_fields"]["center_y"])) > 0.5

    def saturated(tier_suffix: str) -> float:
        ids = [t for t, k in enumerate(m["video_keys"]) if k.split("/")[0].endswith(tier_suffix)]
        return float(np.mean([np.mean(np.abs(v[..., : first_nan(v[0, 0])] - 127.5) > 100)
                              for v in (load(sim_root, m["name"], "videos", t) for t in ids)]))

    assert saturated("bonus") > 5 * saturated("main")


def test_deterministic_for_a_seed_and_cli(tmp_path, capsys):
    args = {"mice": 1, "neurons": 3, "trials": 20, "frames": 40}
    a = synthetic.generate(tmp_path / "a", seed=3, **args)
    assert cli.call(synthetic.define_flags, synthetic.run, [str(tmp_path / "b"), "--seed", "3"]
                    + [x for k, v in args.items() for x in (f"--{k}", str(v))]) == 0
    assert "noise ceiling" in capsys.readouterr().out
    c = synthetic.generate(tmp_path / "c", seed=4, **args)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")
                           if p.is_file())
    assert all((a / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    mouse = synthetic.mouse_names(1)[0]
    data = [f for f in files if f.parts[0] == mouse]
    assert len(data) == 4 * 20 + 19  # 4 modalities, tiers, 2 neuron files, 4 x 4 statistics
    differ = [f for f in data if (a / f).read_bytes() != (c / f).read_bytes()]
    assert len(differ) > 0.9 * len(data)
    assert json.loads((c / "simulation" / "simulation.json").read_text())["seed"] == 4
    assert json.loads((a / "simulation" / "simulation.json").read_text())["seed"] == 3
    with pytest.raises(FileExistsError):
        synthetic.generate(a, seed=3, **args)
