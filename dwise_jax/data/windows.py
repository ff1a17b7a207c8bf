"""Frame windows, the 5-channel model input, training targets and the CutMix box.

Pure functions: NumPy on the host (windows, targets, CutMix), jax.numpy on the device for the
input planes (docs/data.md#windows-and-batches). All values are raw, as the original uses them
(docs/original.md#inputs-and-windows).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

WINDOW_FRAMES = 16
FRAME_STEP = 2
BEHIND = (WINDOW_FRAMES - 1) * FRAME_STEP  # 30: the first anchor with a full window
CANVAS = 64
VIDEO_HEIGHT, VIDEO_WIDTH = 36, 64
TOP = (CANVAS - VIDEO_HEIGHT) // 2  # 14: the video fills rows 14..49


def window_indexes(anchor: int | np.ndarray) -> np.ndarray:
    """Frame indexes of the window(s) ending at `anchor`: (..., 16), a-30, a-28, ..., a."""
    anchor = np.asarray(anchor, dtype=np.int64)
    return anchor[..., None] - BEHIND + FRAME_STEP * np.arange(WINDOW_FRAMES)


def validation_anchors(length: int) -> np.ndarray:
    """Anchors of the non-overlapping validation windows: 30 + 31 k, length // 31 of them."""
    return BEHIND + (BEHIND + 1) * np.arange(length // (BEHIND + 1))


def prediction_anchors(length: int, stride: int = 1) -> np.ndarray:
    """Anchors of the sliding prediction windows of a trial of `length` frames: every anchor in
    [30, length - 1] (stride 1, the original's), else the pairs (30 + k s, 31 + k s) and the
    last two frames (a window covers one parity; every frame stays covered)."""
    if length < BEHIND + 1:
        raise ValueError(f"a trial of {length} frames is shorter than one window ({BEHIND + 1})")
    if not 1 <= stride <= BEHIND:
        raise ValueError(f"anchor stride must be in 1..{BEHIND}, got {stride}")
    if stride == 1:
        return np.arange(BEHIND, length)
    starts = np.arange(BEHIND, length, stride)
    anchors = np.concatenate([starts, starts + 1, [length - 2, length - 1]])
    return np.unique(anchors[(anchors >= BEHIND) & (anchors < length)])


def window_counts(length: int, anchors: np.ndarray | None = None) -> np.ndarray:
    """How many windows cover each frame of a trial, (length,) int64."""
    anchors = prediction_anchors(length) if anchors is None else anchors
    counts = np.zeros(length, dtype=np.int64)
    np.add.at(counts, window_indexes(anchors).ravel(), 1)
    return counts


def traces_of(behavior: np.ndarray, pupil_center: np.ndarray) -> np.ndarray:
    """The four per-frame traces of a trial, (T, 4): behaviour rows then pupil-centre rows."""
    return np.concatenate([behavior, pupil_center], axis=0).T.astype(np.float32)


def compact_window(video: np.ndarray, behavior: np.ndarray, pupil_center: np.ndarray,
                   anchor: int) -> tuple[np.ndarray, np.ndarray]:
    """Compact inputs of one window read from the trial arrays: frames (16, 36, 64) float32
    and traces (16, 4) float32."""
    idx = window_indexes(anchor)
    frames = np.moveaxis(np.asarray(video[:, :, idx], dtype=np.float32), -1, 0)
    traces = np.stack([behavior[0, idx], behavior[1, idx],
                       pupil_center[0, idx], pupil_center[1, idx]], axis=-1).astype(np.float32)
    return frames, traces


def expand_inputs(frames, traces, box=None, partner_traces=None, xp=jnp, rows=CANVAS):
    """Model inputs from compact arrays: (..., 16, 36, 64), (..., 16, 4) -> (..., 16, rows, 64, 5):
    the frame in rows 14..49 of a zero canvas, four constant planes; inside a CutMix `box`
    (..., 4) the planes of `partner_traces`. `xp` is jax.numpy (the default) or numpy. `rows`
    (even, 36..64) builds only the canvas's middle rows, what a model of `canvas_rows` sees."""
    frames = xp.asarray(frames, dtype=xp.float32)
    traces = xp.asarray(traces, dtype=xp.float32)
    lead, top = frames.shape[:-2], (CANVAS - rows) // 2
    pad = [(0, 0)] * len(lead) + [(TOP - top, top + rows - TOP - VIDEO_HEIGHT),
                                  (0, CANVAS - VIDEO_WIDTH)]
    video = xp.pad(frames, pad)[..., None]
    planes = xp.broadcast_to(traces[..., None, None, :], (*lead, rows, CANVAS, 4))
    if box is not None:
        inside = box_mask(box, xp.arange(top, top + rows), xp.arange(CANVAS), xp)
        inside = inside[..., None, :, :, None]
        planes = xp.where(inside, xp.asarray(partner_traces)[..., None, None, :], planes)
    return xp.concatenate([video, planes], axis=-1)


def window_targets(responses: np.ndarray, anchor: int) -> np.ndarray:
    """Training target of one window: responses at its 16 frames, ReLU'd, (16, neurons) float32."""
    target = np.asarray(responses[:, window_indexes(anchor)], dtype=np.float32).T
    return np.maximum(target, 0.0)


# CutMix (docs/original.md#cutmix-box), on the host in the compact layout (`cutmix`); the trace
# planes inside the box are drawn by `expand_inputs` from the partner's traces.


def cutmix_box(lam: float, center_row: int, center_col: int) -> np.ndarray:
    """The original's CutMix box [r1, c1, r2, c2] (rows r1:r2, columns c1:c2): with cut =
    int(64 * sqrt(lam)), [c - cut // 2, c + cut // 2) on each axis clipped to [0, 64]."""
    half = int(CANVAS * math.sqrt(lam)) // 2
    r1, r2 = np.clip([center_row - half, center_row + half], 0, CANVAS)
    c1, c2 = np.clip([center_col - half, center_col + half], 0, CANVAS)
    return np.array([r1, c1, r2, c2], dtype=np.int64)


def draw_cutmix(rng: np.random.Generator, alpha: float, prob: float) -> np.ndarray:
    """One sample's CutMix box [r1, c1, r2, c2], all zeros when not applied. Draw order: apply
    (probability `prob`), lambda ~ Beta(alpha, alpha), centre row and column in 0..63."""
    apply = rng.random() < prob
    lam = rng.beta(alpha, alpha)
    row, col = rng.integers(CANVAS), rng.integers(CANVAS)
    if not apply:
        return np.zeros(4, dtype=np.int64)
    return cutmix_box(lam, int(row), int(col))


def box_fraction(box):
    """Pasted fraction of the canvas, (r2 - r1) * (c2 - c1) / 64**2, for box(es) (..., 4)."""
    box = np.asarray(box)
    area = (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])
    return area.astype(np.float32) / float(CANVAS * CANVAS)


def box_mask(box, rows, cols, xp=np):
    """(..., len(rows), len(cols)) bool: which of these canvas rows and columns the box(es)
    (..., 4) [r1, c1, r2, c2] cover."""
    box = xp.asarray(box)
    in_rows = (rows >= box[..., 0, None]) & (rows < box[..., 2, None])
    in_cols = (cols >= box[..., 1, None]) & (cols < box[..., 3, None])
    return in_rows[..., :, None] & in_cols[..., None, :]


def cutmix(frames, targets, partner_frames, partner_targets, box):
    """One training sample's CutMix on the host, in the compact layout: (frames with the
    partner's pasted inside the box, (1 - a) targets + a partner_targets), a the pasted fraction
    of the canvas. Frames (16, 36, 64) fill canvas rows 14..49; targets (16, neurons) float32."""
    a = box_fraction(box)
    if a == 0:
        return frames, targets
    inside = box_mask(box, np.arange(VIDEO_HEIGHT) + TOP, np.arange(VIDEO_WIDTH))
    return np.where(inside, partner_frames, frames), (1.0 - a) * targets + a * partner_targets
