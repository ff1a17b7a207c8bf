"""Frame windows, model inputs, targets and CutMix against the original's numbers (pipeline.npz
items 2, 3 and 7) and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from dwise_jax.data import windows


def _cl(x: np.ndarray) -> np.ndarray:
    """(..., C, T, H, W) -> channels-last (..., T, H, W, C)."""
    return np.moveaxis(x, -4, -1)


def test_window_indexes_equal_fixture(pipeline_fixture):
    f, _ = pipeline_fixture
    np.testing.assert_array_equal(windows.window_indexes(f["indexes/anchors"]),
                                  f["indexes/make_indexes"])
    assert windows.window_indexes(30).tolist() == list(range(0, 31, 2))


def test_validation_windows_equal_fixture(pipeline_fixture):
    f, _ = pipeline_fixture
    trial_index, indexes = [], []
    for t, length in enumerate(f["indexes/val/lengths"]):
        for anchor in windows.validation_anchors(int(length)):
            trial_index.append(t)
            indexes.append(windows.window_indexes(anchor))
    np.testing.assert_array_equal(trial_index, f["indexes/val/trial_index"])
    np.testing.assert_array_equal(np.array(indexes), f["indexes/val/indexes"])


def test_prediction_anchors_and_counts_equal_fixture(pipeline_fixture):
    f, _ = pipeline_fixture
    length = len(f["indexes/predictor/window_count"])
    anchors = windows.prediction_anchors(length)
    np.testing.assert_array_equal(anchors, f["indexes/predictor/anchors"])
    np.testing.assert_array_equal(windows.window_counts(length),
                                  f["indexes/predictor/window_count"])


@pytest.mark.parametrize("length", [31, 32, 57, 300])
def test_window_counts_follow_closed_form(length):
    # Frame f is covered by #{k in 0..15 : 30 <= f + 2k <= L - 1} windows
    # (docs/original.md#prediction).
    expected = [sum(30 <= f + 2 * k <= length - 1 for k in range(16)) for f in range(length)]
    np.testing.assert_array_equal(windows.window_counts(length), expected)


@pytest.mark.parametrize("length,stride", [(100, 2), (100, 4), (301, 5), (64, 30), (32, 7)])
def test_prediction_anchor_stride_covers_every_frame(length, stride):
    anchors = windows.prediction_anchors(length, stride=stride)
    assert anchors[0] == 30 and anchors[-1] == length - 1
    counts = windows.window_counts(length, anchors)
    assert counts.min() >= 1
    assert len(anchors) <= 2 * ((length - 30) // stride + 2)
    with pytest.raises(ValueError, match="shorter than one window"):
        windows.prediction_anchors(30)
    with pytest.raises(ValueError, match="stride"):
        windows.prediction_anchors(100, stride=31)


def test_inputs_and_targets_equal_fixture(pipeline_fixture):
    f, _ = pipeline_fixture
    video, behavior = f["trial/video"], f["trial/behavior"]
    pupil, responses = f["trial/pupil_center"], f["trial/responses"]
    for i, anchor in enumerate(f["inputs/anchors"]):
        frames, traces = windows.compact_window(video, behavior, pupil, int(anchor))
        x = np.asarray(windows.expand_inputs(frames, traces))
        np.testing.assert_array_equal(x, _cl(f["inputs/x"][i]))
        np.testing.assert_array_equal(windows.expand_inputs(frames, traces, xp=np),
                                      _cl(f["inputs/x"][i]))
        np.testing.assert_array_equal(windows.window_targets(responses, int(anchor)),
                                      f["inputs/responses"][i].T)


def test_input_layout_by_hand():
    rng = np.random.default_rng(0)
    frames = rng.uniform(0, 255, size=(2, 16, 36, 64)).astype(np.float32)
    traces = rng.normal(size=(2, 16, 4)).astype(np.float32)
    x = windows.expand_inputs(frames, traces, xp=np)
    assert x.shape == (2, 16, 64, 64, 5) and x.dtype == np.float32
    np.testing.assert_array_equal(x[..., 14:50, :, 0], frames)
    assert not x[..., :14, :, 0].any() and not x[..., 50:, :, 0].any()
    for c in range(4):
        np.testing.assert_array_equal(x[..., c + 1], np.broadcast_to(
            traces[..., c, None, None], (2, 16, 64, 64)))


def _compact(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frames, traces) of a model input built by expand_inputs (checked by the round trip)."""
    frames, traces = x[..., 14:50, :, 0], x[..., 0, 0, 1:]
    np.testing.assert_array_equal(windows.expand_inputs(frames, traces, xp=np), x)
    return frames, traces


@pytest.mark.parametrize("seed", ["0", "1", "2", "7"])
def test_cutmix_equals_fixture(pipeline_fixture, seed):
    f, meta = pipeline_fixture
    draw = meta["cutmix"]["seeds"][seed]
    box = windows.cutmix_box(draw["lam_drawn"], draw["center_cx"], draw["center_cy"])
    np.testing.assert_array_equal(box, f[f"cutmix/seed{seed}/box"])
    assert windows.box_fraction(box) == pytest.approx(draw["area_fraction"], abs=0)
    (frames1, traces1), (frames2, traces2) = _compact(_cl(f["cutmix/x1"])), _compact(
        _cl(f["cutmix/x2"]))
    frames, y = windows.cutmix(frames1, f["cutmix/y1"].T, frames2, f["cutmix/y2"].T, box)
    for xp in (np, windows.jnp):
        x = windows.expand_inputs(frames, traces1, box, traces2, xp=xp)
        np.testing.assert_array_equal(np.asarray(x), _cl(f[f"cutmix/seed{seed}/inputs"]))
        for rows in (36, 50):  # a model's canvas_rows: the canvas's middle rows only
            top = (64 - rows) // 2
            part = windows.expand_inputs(frames, traces1, box, traces2, xp=xp, rows=rows)
            np.testing.assert_array_equal(np.asarray(part), np.asarray(x)[:, top:top + rows])
    expected = f[f"cutmix/seed{seed}/target"].T
    assert np.abs(y - expected).max() / np.abs(expected).max() < 1e-5


def test_cutmix_box_geometry_by_hand():
    # lam = 0.25 -> cut = 32, half 16: centre (20, 60) spans rows 4..36, cols 44..64 (clipped).
    np.testing.assert_array_equal(windows.cutmix_box(0.25, 20, 60), [4, 44, 36, 64])
    # odd cut: lam with int(64 sqrt(lam)) = 33 -> half 16, side 32, one less than cut.
    lam = (33.5 / 64) ** 2
    np.testing.assert_array_equal(windows.cutmix_box(lam, 32, 32), [16, 16, 48, 48])
    np.testing.assert_array_equal(windows.cutmix_box(1e-4, 10, 10), [10, 10, 10, 10])


def test_cutmix_by_hand():
    frames1, frames2 = np.zeros((3, 36, 64), np.float32), np.ones((3, 36, 64), np.float32)
    traces1, traces2 = np.zeros((3, 4), np.float32), np.full((3, 4), 3.0, np.float32)
    y1, y2 = np.zeros((3, 7), np.float32), np.full((3, 7), 2.0, np.float32)
    # Rows 0..31 of the canvas: the video's rows 0..17 (canvas 14..31); columns 0..15.
    box = np.array([0, 0, 32, 16])
    frames, y = windows.cutmix(frames1, y1, frames2, y2, box)
    assert frames.sum() == 3 * 18 * 16 and frames[:, :18, :16].all()
    np.testing.assert_allclose(y, 2.0 * 32 * 16 / 4096)
    x = windows.expand_inputs(frames, traces1, box, traces2, xp=np)
    assert (x[:, :32, :16, 1:] == 3.0).all() and x[..., 1:].sum() == 3 * 32 * 16 * 4 * 3.0
    assert x[..., 0].sum() == 3 * 18 * 16
    empty = np.zeros(4, np.int64)
    frames, y = windows.cutmix(frames1, y1, frames2, y2, empty)
    assert not frames.any() and not y.any()
    assert not windows.expand_inputs(frames, traces1, empty, traces2, xp=np).any()


def test_draw_cutmix_is_deterministic_and_applies_with_probability():
    boxes = [windows.draw_cutmix(np.random.default_rng(s), 1.0, 0.5) for s in range(400)]
    again = [windows.draw_cutmix(np.random.default_rng(s), 1.0, 0.5) for s in range(400)]
    np.testing.assert_array_equal(boxes, again)
    applied = np.mean([windows.box_fraction(b) > 0 for b in boxes])
    assert 0.4 < applied < 0.6
    assert all(windows.draw_cutmix(np.random.default_rng(s), 1.0, 0.0).sum() == 0
               for s in range(20))
