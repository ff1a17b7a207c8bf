"""Folds by perceptual video hash: parity with the original (pipeline.npz items 1 and 5),
the hash against imagehash and an independent DCT, fold rules, balance and caching."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import imagehash
import numpy as np
import pytest
import scipy.fft
from PIL import Image

from dwise_jax.data import folds

NEW_TIERS = frozenset({"train", "oracle"})


def _new_run() -> None:
    """As in a new process: the folds computed in this one are forgotten, the on-disk caches
    stay."""
    folds._MEMO.clear()


def _fold_of_hash(h) -> int:
    """The original's fold of a video hash, in Python's unbounded ints."""
    return int(h) % folds.NUM_FOLDS


def _after_folds(assignment: folds.FoldAssignment) -> np.ndarray:
    """(trials,) str: ``fold_<k>`` for trials with a fold, the other tiers unchanged."""
    return np.where(assignment.folds >= 0, np.char.add("fold_", assignment.folds.astype(str)),
                    assignment.tiers)


def _fold_tiers(mouse) -> np.ndarray:
    return _after_folds(folds.mouse_folds(mouse))


@pytest.fixture(autouse=True)
def _fresh_memo():
    _new_run()
    yield
    _new_run()


def _video(f, index: int) -> np.ndarray:
    return f[f"phash/video/{index:02d}"]


def _padded(video: np.ndarray, array_length: int) -> np.ndarray:
    """The video's valid frames re-padded with NaN to ``array_length`` frames."""
    length = folds.video_length(video)
    out = np.full(video.shape[:2] + (array_length,), np.nan, np.float32)
    out[..., :length] = video[..., :length]
    return out


def _dct_phash(frame: np.ndarray) -> int:
    """phash written from its definition: LANCZOS 32x32, 2-D DCT-II, 8x8 > median, MSB first."""
    image = Image.fromarray(frame.astype(np.uint8)).resize((32, 32), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, np.float64)
    dct = scipy.fft.dct(scipy.fft.dct(pixels, axis=0), axis=1)[:8, :8]
    value = 0
    for bit in (dct > np.median(dct)).ravel():
        value = (value << 1) | int(bit)
    return value


# --------------------------------------------------------------------------- item 1


def test_fixture_hashes_and_folds_exact(pipeline_fixture):
    f, meta = pipeline_fixture
    for i in range(meta["phash"]["n_videos"]):
        video = _video(f, i)
        length = folds.video_length(video)
        assert length == f["phash/length"][i]
        frames = folds.video_hash_frames(length)
        assert frames == f["phash/frame_index"][i].tolist()
        assert [folds.frame_phash(video[..., t]) for t in frames] == [
            int(h) for h in f["phash/frame_hash"][i]
        ]
        h = folds.video_hash(video)
        assert h == int(f["phash/hash"][i]) == int(meta["phash"]["hash_decimal"][i])
        assert _fold_of_hash(h) == f["phash/fold"][i]


def test_exact_copies_share_hash_noisy_copy_need_not(pipeline_fixture):
    f, _ = pipeline_fixture
    hashes = [folds.video_hash(_video(f, i)) for i in (0, 12, 4, 13, 2, 14)]
    assert hashes[0] == hashes[1] and hashes[2] == hashes[3]
    assert hashes[4] != hashes[5]  # recorded by the original: 8 of 64 bits differ
    # The same video stored with a longer NaN tail (another trial or mouse) keeps its hash.
    assert folds.video_hash(_padded(_video(f, 0), 330)) == hashes[0]


def test_frame_phash_equals_imagehash_and_dct_rule(pipeline_fixture):
    f, _ = pipeline_fixture
    rng = np.random.default_rng(0)
    frames = [rng.uniform(0, 255, (36, 64)).astype(np.float32) for _ in range(4)]
    frames += [_video(f, i)[..., 100] for i in (1, 5, 9)]
    frames.append(np.tile(np.linspace(0, 255, 64, dtype=np.float32), (36, 1)))
    for frame in frames:
        direct = imagehash.phash(Image.fromarray(frame.astype(np.uint8)))
        ours = folds.frame_phash(frame)
        assert ours == int(str(direct), 16)
        assert f"{ours:016x}" == str(direct)
        assert ours == _dct_phash(frame)


def test_frame_phash_truncates_to_uint8():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (36, 64)).astype(np.float32)
    assert folds.frame_phash(base + 0.75) == folds.frame_phash(base)


def test_video_hash_frames_and_length():
    assert folds.video_hash_frames(300) == [30, 90, 150, 210, 270]
    assert folds.video_hash_frames(313) == [31, 93, 155, 217, 279]
    assert folds.video_hash_frames(250) == [25, 75, 125, 175, 225]
    assert folds.video_hash_frames(7) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        folds.video_hash_frames(4)
    video = np.zeros((36, 64, 20), np.float32)
    assert folds.video_length(video) == 20
    video[..., 12:] = np.nan
    assert folds.video_length(video) == 12


def test_hash_kept_exact_as_uint64(pipeline_fixture):
    f, _ = pipeline_fixture
    hashes = [int(h) for h in f["phash/hash"]]
    assert all(2**63 <= h < 2**64 for h in hashes[:3])  # would overflow int64
    assert [_fold_of_hash(np.uint64(h)) for h in hashes] == f["phash/fold"].tolist()
    # float64 drops low bits: the fold would change for some of these videos.
    assert any(int(float(h)) % 7 != h % 7 for h in hashes)


# --------------------------------------------------------------------------- rules, item 5


def test_tiers_with_folds_rule():
    all_labeled = {"train", "oracle", "live_test_main", "final_test_bonus", "none"}
    assert folds.tiers_with_folds(False, all_labeled) == NEW_TIERS
    assert folds.tiers_with_folds(False, ()) == NEW_TIERS
    assert folds.tiers_with_folds(True, all_labeled) == all_labeled - {"none"}
    # Old mice whose test labels were never fetched: only the really labeled tiers.
    assert folds.tiers_with_folds(True, NEW_TIERS) == NEW_TIERS


def _fake_assignment(f, meta, m: int) -> folds.FoldAssignment:
    array_length = meta["fake_dataset"]["array_length"][m]
    index = f[f"fake/mouse{m}/video_index"]
    load = lambda t: _padded(_video(f, int(index[t])), array_length)
    return folds.assign_folds(f[f"fake/mouse{m}/tiers"], load, NEW_TIERS)


def test_fake_dataset_tiers_after_folds_exact(pipeline_fixture):
    f, meta = pipeline_fixture
    for m in range(len(meta["fake_dataset"]["mice"])):
        got = _fake_assignment(f, meta, m)
        np.testing.assert_array_equal(_after_folds(got), f[f"fake/mouse{m}/tiers_after_folds"])
        tiers = f[f"fake/mouse{m}/tiers"]
        assert ((got.folds >= 0) == np.isin(tiers, ["train", "oracle"])).all()
        hashed = np.flatnonzero(got.folds >= 0)
        index = f[f"fake/mouse{m}/video_index"]
        lengths = [folds.video_length(_video(f, int(index[t]))) for t in hashed]
        np.testing.assert_array_equal(lengths, f[f"fake/mouse{m}/length"][hashed])


def test_same_video_same_fold_across_trials_and_mice(pipeline_fixture):
    f, meta = pipeline_fixture
    fold_of_video: dict[int, set[int]] = {}
    for m in range(len(meta["fake_dataset"]["mice"])):
        got = _fake_assignment(f, meta, m)
        for video, fold in zip(f[f"fake/mouse{m}/video_index"], got.folds, strict=True):
            if fold >= 0:
                fold_of_video.setdefault(int(f["phash/hash"][video]), set()).add(int(fold))
    assert all(len(v) == 1 for v in fold_of_video.values())
    assert any(len(v) for v in fold_of_video.values())


def test_folds_roughly_balanced():
    rng = np.random.default_rng(7)
    n = 350
    hashes = [
        folds.video_hash(rng.uniform(0, 255, (36, 64, 10)).astype(np.float32)) for _ in range(n)
    ]
    assert len(set(hashes)) == n
    counts = folds.fold_counts(np.array([_fold_of_hash(h) for h in hashes]))
    expected = n / folds.NUM_FOLDS
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, counts  # 6 degrees of freedom: P(chi2 > 30) is about 4e-5
    assert counts.sum() == n


# --------------------------------------------------------------------------- on disk


def write_fake_dataset(root: Path, f, meta, mice: list[int]) -> list[Path]:
    """Write fake mice of pipeline.npz item 5 in the real on-disk layout; return their paths."""
    fake = meta["fake_dataset"]
    rng = np.random.default_rng(0)
    paths = []
    for m in mice:
        path = root / fake["mice"][m]
        tiers, lengths = f[f"fake/mouse{m}/tiers"], f[f"fake/mouse{m}/length"]
        neurons, array_length = fake["neurons"][m], fake["array_length"][m]
        for sub in ("videos", "behavior", "pupil_center", "responses"):
            (path / "data" / sub).mkdir(parents=True)
        for t, (video_index, length) in enumerate(
            zip(f[f"fake/mouse{m}/video_index"], lengths, strict=True)
        ):
            key = f"fake/mouse{m}/responses/{t}"
            responses = f[key] if key in f.files else np.zeros((neurons, array_length), np.float32)
            responses = responses.copy()
            responses[:, length:] = np.nan
            trial = {
                "videos": _padded(_video(f, int(video_index)), array_length),
                "behavior": rng.random((2, array_length)).astype(np.float32),
                "pupil_center": rng.random((2, array_length)).astype(np.float32),
                "responses": responses,
            }
            for sub, array in trial.items():
                array[..., length:] = np.nan
                np.save(path / "data" / sub / f"{t}.npy", array)
        for sub in ("trials", "neurons", "statistics/responses/all"):
            (path / "meta" / sub).mkdir(parents=True)
        np.save(path / "meta/trials/tiers.npy", tiers)
        np.save(path / "meta/neurons/unit_ids.npy", f[f"fake/mouse{m}/unit_ids"])
        coords = rng.normal(size=(neurons, 3)).astype(np.float32)
        np.save(path / "meta/neurons/cell_motor_coordinates.npy", coords)
        np.save(path / "meta/statistics/responses/all/std.npy", f[f"fake/mouse{m}/std"])
        paths.append(path)
    return paths


@dataclasses.dataclass(eq=False)
class DiskMouse:
    """The part of sensorium.Mouse that folds.py uses, read from the real layout."""

    path: Path
    is_real_old: bool = False
    labeled_tiers: frozenset[str] = NEW_TIERS

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tiers(self) -> np.ndarray:
        return np.load(self.path / "meta/trials/tiers.npy")

    @property
    def num_trials(self) -> int:
        return len(self.tiers)

    def load(self, modality: str, trial_id: int) -> np.ndarray:
        return np.load(self.path / "data" / modality / f"{trial_id}.npy", mmap_mode="r")


@pytest.fixture
def disk_mouse(tmp_path, pipeline_fixture) -> DiskMouse:
    f, meta = pipeline_fixture
    return DiskMouse(write_fake_dataset(tmp_path, f, meta, [0])[0])


@pytest.fixture
def hash_calls(monkeypatch) -> list[int]:
    """Counts video hashes computed through folds.video_hash."""
    calls: list[int] = []
    original = folds.video_hash

    def counting(video: np.ndarray) -> int:
        calls.append(1)
        return original(video)

    monkeypatch.setattr(folds, "video_hash", counting)
    return calls


def test_mouse_folds_cached_in_memory_and_on_disk(disk_mouse, pipeline_fixture, hash_calls):
    f, _ = pipeline_fixture
    expected = f["fake/mouse0/tiers_after_folds"]
    n_hashed = int(np.isin(f["fake/mouse0/tiers"], ["train", "oracle"]).sum())
    np.testing.assert_array_equal(_fold_tiers(disk_mouse), expected)
    assert len(hash_calls) == n_hashed
    cache = folds.cache_file(disk_mouse)
    assert cache.exists() and cache.stat().st_mode & 0o044 == 0o044  # readable by others
    assert cache.parent.parent == Path(os.environ["DWISE_JAX_CACHE"])  # the run's cache folder
    assert [p.name for p in cache.parent.iterdir() if p.name.startswith(".folds-")] == []
    # the dataset is only read: its trials folder holds what it held
    assert sorted(p.name for p in (disk_mouse.path / "meta/trials").iterdir()) == ["tiers.npy"]
    folds.trial_folds(disk_mouse)
    _fold_tiers(disk_mouse)
    assert len(hash_calls) == n_hashed  # memoised: no second hashing in this run
    _new_run()
    np.testing.assert_array_equal(_fold_tiers(disk_mouse), expected)
    assert len(hash_calls) == n_hashed  # a new run reads the cache
    got = folds.mouse_folds(disk_mouse)
    assert got.folds.dtype == np.int8 and got.hashes.dtype == np.uint64
    assert not got.folds.flags.writeable  # the memoised result cannot be changed by a caller
    want = [
        _fold_of_hash(int(h)) if t.startswith("fold_") else -1
        for h, t in zip(got.hashes, expected, strict=True)
    ]
    assert got.folds.tolist() == want


def test_cache_invalidated_when_tiers_change(disk_mouse, hash_calls):
    folds.trial_folds(disk_mouse)
    first = len(hash_calls)
    tiers = disk_mouse.tiers.copy()
    tiers[tiers == "none"] = "train"
    np.save(disk_mouse.path / "meta/trials/tiers.npy", tiers)
    st = (disk_mouse.path / "meta/trials/tiers.npy").stat()
    os.utime(disk_mouse.path / "meta/trials/tiers.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    got = folds.trial_folds(disk_mouse)  # the memo is keyed on the file too
    assert len(hash_calls) == 2 * first + 1  # stale cache: every needed trial hashed again
    assert (got >= 0).sum() == first + 1


def test_more_labeled_tiers_reuse_cached_hashes(disk_mouse, hash_calls):
    folds.trial_folds(disk_mouse)
    first = len(hash_calls)
    old = dataclasses.replace(
        disk_mouse, is_real_old=True, labeled_tiers=frozenset(set(disk_mouse.tiers))
    )
    got = _fold_tiers(old)
    assert len(hash_calls) == first + int(
        np.isin(disk_mouse.tiers, ["live_test_main", "final_test_main"]).sum()
    )
    assert (got == "none").sum() == 1 and all(t.startswith("fold_") or t == "none" for t in got)


def test_malformed_cache_recomputed(disk_mouse, pipeline_fixture, hash_calls):
    f, _ = pipeline_fixture
    folds.cache_file(disk_mouse).parent.mkdir(parents=True, exist_ok=True)
    folds.cache_file(disk_mouse).write_bytes(b"not an npz")
    np.testing.assert_array_equal(_fold_tiers(disk_mouse), f["fake/mouse0/tiers_after_folds"])
    assert len(hash_calls) > 0
    _new_run()
    calls = len(hash_calls)
    _fold_tiers(disk_mouse)
    assert len(hash_calls) == calls  # the rewritten cache is good


def test_unwritable_cache_folder_tolerated(disk_mouse, pipeline_fixture, monkeypatch, tmp_path):
    f, _ = pipeline_fixture
    want = f["fake/mouse0/tiers_after_folds"]

    def refuse(*args, **kwargs):
        raise PermissionError("read-only cache")

    monkeypatch.setattr(folds.os, "replace", refuse)
    np.testing.assert_array_equal(_fold_tiers(disk_mouse), want)
    cache = folds.cache_file(disk_mouse)
    assert not cache.exists()
    assert [p.name for p in cache.parent.iterdir() if p.name.startswith(".folds-")] == []
    monkeypatch.undo()
    _new_run()
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked_cache"
        locked.mkdir(mode=0o555)
        monkeypatch.setenv(folds.CACHE_ENV, str(locked))
        try:
            np.testing.assert_array_equal(_fold_tiers(disk_mouse), want)
            assert list(locked.iterdir()) == []
        finally:
            locked.chmod(0o755)
    assert sorted(p.name for p in (disk_mouse.path / "meta/trials").iterdir()) == ["tiers.npy"]


def test_cache_folder_default_is_the_users_cache(disk_mouse, monkeypatch, tmp_path):
    monkeypatch.delenv(folds.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    first = folds.cache_file(disk_mouse)
    assert first.parent == tmp_path / "xdg" / "dwise_jax" / "folds"
    assert first.name.startswith(disk_mouse.path.name + "-")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert folds.cache_file(disk_mouse).parent == tmp_path / "home/.cache/dwise_jax/folds"
    # another dataset with a mouse of the same name gets another file
    other = dataclasses.replace(disk_mouse, path=tmp_path / "elsewhere" / disk_mouse.path.name)
    assert folds.cache_file(other) != folds.cache_file(disk_mouse)


def test_fold_balance_report(tmp_path, pipeline_fixture):
    f, meta = pipeline_fixture
    mice = [DiskMouse(p) for p in write_fake_dataset(tmp_path, f, meta, [0, 2])]
    balance = folds.fold_balance(mice)
    assert list(balance) == [meta["fake_dataset"]["mice"][m] for m in (0, 2)]
    for m, counts in zip((0, 2), balance.values(), strict=True):
        after = f[f"fake/mouse{m}/tiers_after_folds"]
        assert counts.tolist() == [int((after == f"fold_{k}").sum()) for k in range(7)]
    text = folds.format_fold_balance(balance)
    assert "fold_6" in text and text.splitlines()[-1].split()[1:] == [
        str(int(c)) for c in sum(balance.values())
    ]


def test_folds_through_sensorium_dataset(tmp_path, pipeline_fixture):
    from dwise_jax.data import sensorium

    f, meta = pipeline_fixture
    write_fake_dataset(tmp_path, f, meta, list(range(5)))
    dataset = sensorium.SensoriumDataset.open(tmp_path)
    by_name = {mouse.name: mouse for mouse in dataset.mice}
    for m, name in enumerate(meta["fake_dataset"]["mice"]):
        np.testing.assert_array_equal(
            _fold_tiers(by_name[name]), f[f"fake/mouse{m}/tiers_after_folds"]
        )
