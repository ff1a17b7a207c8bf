"""Frame windows, the 5-channel model input, training targets and the CutMix box.

Pure functions, NumPy on the host and (for the input planes and CutMix) jax.numpy on the device,
so that the loader can ship compact arrays and the planes are built where they cost nothing.

Windows (as the original's frame stack of size 16, step 2, anchored at the last frame): the
window of anchor frame `a` holds frames a-30, a-28, ..., a (16 frames at 15 Hz, ~1 s). The model
predicts one output per input frame; the target is the responses at the same 16 frames.

Model input, channels-last `(time=16, height=64, width=64, channels=5)`:
  channel 0: the raw video frame (0..255, no scaling), 36 x 64, placed in rows 14..49 of a
             64 x 64 canvas of zeros (padded, not resized);
  channels 1-2: behaviour (pupil dilation, running speed), each a constant 64 x 64 plane;
  channels 3-4: pupil centre (x, y), constant planes. All values raw, as the original uses them.

Compact form shipped by the loader (about a tenth of the bytes): `frames` (..., 16, 36, 64) and
`traces` (..., 16, 4) = [behavior[0], behavior[1], pupil_center[0], pupil_center[1]];
`expand_inputs` turns them into the planes above.
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
NUM_CHANNELS = 5


def window_indexes(anchor: int | np.ndarray) -> np.ndarray:
    """Frame indexes of the window(s) ending at `anchor`: (..., 16), a-30, a-28, ..., a."""
    anchor = np.asarray(anchor, dtype=np.int64)
    return anchor[..., None] - BEHIND + FRAME_STEP * np.arange(WINDOW_FRAMES)


def validation_anchors(length: int) -> np.ndarray:
    """Anchors of the non-overlapping validation windows: 30 + 31 k, length // 31 of them."""
    return BEHIND + (BEHIND + 1) * np.arange(length // (BEHIND + 1))


def prediction_anchors(length: int, stride: int = 1) -> np.ndarray:
    """Anchors of the sliding prediction windows of a trial of `length` frames.

    With stride 1 (the original) every anchor in [30, length - 1], so frames are covered by up to
    16 windows. A window steps by 2 frames, so it covers only frames of its anchor's parity: with
    a stride s > 1 the anchors come in pairs (30 + k s, 31 + k s), plus the last two frames, so
    that every frame stays covered (about 2 (length - 30) / s windows).
    """
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
    """Compact inputs of one window: frames (16, 36, 64) float32 and traces (16, 4) float32.

    Reads only the 16 frames of the window from the (memory-mapped) trial arrays.
    """
    idx = window_indexes(anchor)
    frames = np.moveaxis(np.asarray(video[:, :, idx], dtype=np.float32), -1, 0)
    traces = np.stack([behavior[0, idx], behavior[1, idx],
                       pupil_center[0, idx], pupil_center[1, idx]], axis=-1).astype(np.float32)
    return frames, traces


def expand_inputs(frames, traces, xp=jnp):
    """Model inputs from compact arrays: (..., 16, 36, 64) and (..., 16, 4) -> (..., 16, 64, 64, 5).

    `xp` is jax.numpy (on the device, the default) or numpy. The values are exactly the
    original's: the frame in rows 14..49 of a zero canvas, then four constant planes.
    """
    frames = xp.asarray(frames, dtype=xp.float32)
    traces = xp.asarray(traces, dtype=xp.float32)
    lead = frames.shape[:-2]
    pad = [(0, 0)] * len(lead) + [(TOP, CANVAS - VIDEO_HEIGHT - TOP), (0, CANVAS - VIDEO_WIDTH)]
    video = xp.pad(frames, pad)[..., None]
    planes = xp.broadcast_to(traces[..., None, None, :], (*lead, CANVAS, CANVAS, 4))
    return xp.concatenate([video, planes], axis=-1)


def window_targets(responses: np.ndarray, anchor: int) -> np.ndarray:
    """Training target of one window: responses at its 16 frames, ReLU'd, (16, neurons) float32."""
    target = np.asarray(responses[:, window_indexes(anchor)], dtype=np.float32).T
    return np.maximum(target, 0.0)


# ----------------------------------------------------------------------------------------------
# CutMix (docs/original.md#cutmix-box): a box from a partner sample of the same mouse is pasted
# into all 5 channels and all 16 frames; targets mix by the pasted fraction of the 64 x 64 canvas.


def cutmix_box(lam: float, center_row: int, center_col: int, size: int = CANVAS) -> np.ndarray:
    """The original's CutMix box [r1, c1, r2, c2] (rows r1:r2, columns c1:c2).

    cut = int(size * sqrt(lam)); the box spans [c - cut // 2, c + cut // 2) on each axis, clipped
    to [0, size], so its unclipped side is 2 * (cut // 2) and cut <= 1 gives an empty box.
    """
    half = int(size * math.sqrt(lam)) // 2
    r1, r2 = np.clip([center_row - half, center_row + half], 0, size)
    c1, c2 = np.clip([center_col - half, center_col + half], 0, size)
    return np.array([r1, c1, r2, c2], dtype=np.int64)


def draw_cutmix(rng: np.random.Generator, alpha: float, prob: float,
                size: int = CANVAS) -> np.ndarray:
    """One sample's CutMix draw: a box [r1, c1, r2, c2], all zeros (empty) when not applied.

    Draw order: apply (probability `prob`), lambda ~ Beta(alpha, alpha), centre row and column
    uniform in 0..size-1. The RNG is the caller's (seeded from seed, epoch and sample index).
    """
    apply = rng.random() < prob
    lam = rng.beta(alpha, alpha)
    row, col = rng.integers(size), rng.integers(size)
    if not apply:
        return np.zeros(4, dtype=np.int64)
    return cutmix_box(lam, int(row), int(col), size)


def box_fraction(box, size: int = CANVAS, xp=np):
    """Pasted fraction of the canvas, (r2 - r1) * (c2 - c1) / size**2, for box(es) (..., 4)."""
    box = xp.asarray(box)
    area = (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])
    return area.astype(xp.float32) / float(size * size)


def apply_cutmix(x1, y1, x2, y2, box, xp=jnp):
    """Pastes x2's box into x1 and mixes the targets by the pasted fraction.

    Args:
      x1, x2: inputs (..., time, height, width, channels).
      y1, y2: targets (..., time, neurons) (any layout whose leading axes match the box's).
      box: (..., 4) int [r1, c1, r2, c2]; an empty box leaves x1 and y1 as they are.
      xp: jax.numpy (device, default) or numpy.

    Returns:
      (mixed inputs, mixed targets) = (x1 with the box from x2, (1 - a) y1 + a y2).
    """
    box = xp.asarray(box)
    height, width = x1.shape[-3], x1.shape[-2]
    rows = xp.arange(height)
    cols = xp.arange(width)
    lead = box.shape[:-1]
    expand = (slice(None),) * len(lead)
    in_rows = (rows >= box[..., 0, None]) & (rows < box[..., 2, None])  # (..., H)
    in_cols = (cols >= box[..., 1, None]) & (cols < box[..., 3, None])  # (..., W)
    mask = in_rows[..., :, None] & in_cols[..., None, :]  # (..., H, W)
    mask = mask[(*expand, None, slice(None), slice(None), None)]  # (..., 1, H, W, 1)
    x = xp.where(mask, x2, x1)
    a = box_fraction(box, size=height, xp=xp)[(*expand, None, None)]
    y = (1.0 - a) * y1 + a * y2
    return x, y
