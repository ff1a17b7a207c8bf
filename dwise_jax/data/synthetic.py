"""A simulated Sensorium 2023 dataset in exactly the real on-disk layout.

`generate` writes mouse folders that `dwise_jax.data.sensorium` reads like the real data, and
`<root>/simulation/` (not a mouse name, so discovery skips it) with what the real data keeps
secret: true test responses, noiseless rates, and `simulation.json` (parameters, each trial's
clip key, the noise ceiling).

How the simulated V1 works:

* Videos: 36 x 64, integer values 0..255. Natural-like clips (train, oracle, none, `*_main`):
  pink-noise scenes (1/f amplitude spectrum) drifting slowly along a jittery path, a cut every
  1-3 s, each scene with its own luminance and contrast. `*_bonus` clips are out of
  distribution: drifting full-contrast gratings, sparse flashing squares on grey, binarised
  drifting noise. A clip's valid length is mostly `frames`, some 0.8x-1x, some 1x-1.1x.
* Shared clips: each oracle clip repeats several times per mouse (exact copies); the oracle
  clips, the test clips and 30% of the train clips are the same for every mouse.
* Behaviour: running speed from a still/running two-state process, smoothed; pupil dilation
  follows running (arousal) and constricts with luminance; the pupil centre makes saccade-like
  jumps (recorded, no effect on the responses).
* Neurons sit on a cortical sheet (cell_motor_coordinates, um) with a linear retinotopic map
  to their receptive-field centres plus scatter. Each has a Gabor field (on 2x2-averaged
  frames) and a biphasic temporal kernel (peak 80-160 ms); 60% are linear cells, 40% energy
  cells (quadrature pair, phase invariant). Drives are scaled to unit variance on natural
  clips, then soft-rectified and saturated.
* Gain: exp(a_run * running + a_pupil * pupil) with per-neuron weights (mostly positive),
  times a hidden slow gain fluctuation (mean 1) that no input reveals.
* Responses: Poisson event counts at that rate, gamma event amplitudes, a short smoothing tail
  (imperfect deconvolution) and a Gaussian floor (sd 0.02) rectified at 0: sparse positive
  events and quiet frames near zero, noisy and non-negative. The noiseless rate is the
  expected response given video and behaviour.

Files: all trial arrays of a mouse share its array length T (longest clip plus 0-4 frames),
with a NaN tail after the valid length in every modality. Test-tier response files hold dummy
zeros with that NaN tail, as the real new mice's do; the truth is in
`simulation/truth/<mouse>/<trial>.npy`, every trial's rate in `simulation/rate/...`.
Statistics (mean, std, min, max per position) cover the train and oracle trials.

All draws come from numpy Generators seeded by (seed, purpose, mouse, trial or clip): a seed
gives byte-identical files on one machine. Usage:
`python -m dwise_jax.data.synthetic OUT_DIR --mice 5 --neurons 100 --trials 100 --frames 300`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
from scipy import signal

from dwise_jax.data.sensorium import MODALITIES, TEST_TIERS, TIERS, VIDEO_HEIGHT, VIDEO_WIDTH

DEFAULTS = {"mice": 5, "neurons": 100, "trials": 100, "frames": 300}
SIMULATION_DIR = "simulation"
FPS = 30
H, W = VIDEO_HEIGHT, VIDEO_WIDTH
_CANVAS = (48, 96)  # pink noise is periodic on this canvas; the 36 x 64 crop rarely shows it
_NAME_HASH = hashlib.md5(b"dwise_jax simulated V1").hexdigest()
# Random streams: (seed, purpose, ...) keeps every draw independent of generation order.
_VIDEO, _MOUSE, _TRIAL, _PLAN, _CALIBRATION = range(5)
_POOLS = ("shared_train", "oracle", *TEST_TIERS, "own")
_KERNEL_FRAMES = 12
_DECONV_TAIL = np.array([1.0, 0.35, 0.12])  # event smearing left by imperfect deconvolution
PARAMETERS = {
    "energy_fraction": 0.4, "shared_train_fraction": 0.3, "rf_sigma_px": [3.0, 6.0],
    "rf_period_px": [8.0, 20.0], "temporal_tau_frames": [1.2, 2.5], "threshold": [0.0, 1.0],
    "saturation": 3.0, "events_per_frame": [0.15, 0.6], "amplitude_gamma_shape": 2.0,
    "hidden_gain_sigma": 0.25, "floor_noise_sd": 0.02, "deconvolution_tail": _DECONV_TAIL.tolist(),
}


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def mouse_names(count: int) -> list[str]:
    """Folder names in the real pattern, never one of the real ten (those are dynamic29xxx)."""
    return [f"dynamic{90001 + m}-{m % 9 + 1}-{m % 7 + 2}-Video-{_NAME_HASH}" for m in range(count)]


# ----------------------------------------------------------------------------- videos
def _smooth(x: np.ndarray, frames: float, axis: int = -1) -> np.ndarray:
    """Causal exponential smoothing with time constant `frames`, starting at x[0]."""
    a = 1.0 / max(frames, 1.0)
    start = (1 - a) * np.take(x, [0], axis=axis)
    return signal.lfilter([a], [1.0, a - 1.0], x, axis=axis, zi=start)[0]


def _slow_noise(rng: np.random.Generator, n: int, frames: float) -> np.ndarray:
    """Stationary AR(1) noise, unit variance, correlation time `frames`."""
    rho = 1.0 - 1.0 / frames
    x = rng.normal(0, np.sqrt(1 - rho**2), n)
    x[0] = rng.normal()
    return signal.lfilter([1.0], [1.0, -rho], x)


def _pink_scene(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, H, W) z-scored pink noise drifting along a jittery path (sub-pixel Fourier shift)."""
    ky = np.fft.fftfreq(_CANVAS[0])[:, None]
    kx = np.fft.rfftfreq(_CANVAS[1])[None, :]
    amp = np.hypot(ky, kx).clip(1.0 / _CANVAS[1]) ** -rng.uniform(0.9, 1.3)  # 1/f^alpha
    amp[0, 0] = 0.0
    spec = (np.fft.rfft2(rng.standard_normal(_CANVAS)) * amp).astype(np.complex64)
    direction = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(0.0, 1.0)  # pixels per frame
    path = np.arange(n)[:, None] * speed * np.array([np.sin(direction), np.cos(direction)])
    path = path + _smooth(np.cumsum(rng.normal(0, 0.3, (n, 2)), 0), 4, axis=0)
    shift_y = np.exp(-2j * np.pi * ky[None] * path[:, 0, None, None]).astype(np.complex64)
    shift_x = np.exp(-2j * np.pi * kx[None] * path[:, 1, None, None]).astype(np.complex64)
    field = np.fft.irfft2(spec[None] * shift_y * shift_x, s=_CANVAS)[:, :H, :W]
    return (field - field.mean()) / (field.std() + 1e-6)


def _natural_video(rng: np.random.Generator, length: int) -> np.ndarray:
    out, t = np.empty((length, H, W), np.float32), 0
    while t < length:
        n = min(length - t, int(rng.integers(30, 91)))  # a scene cut every 1 to 3 s
        out[t:t + n] = rng.uniform(90, 160) + rng.uniform(20, 45) * _pink_scene(rng, n)
        t += n
    return out


def _ood_video(rng: np.random.Generator, length: int) -> np.ndarray:
    """Bonus-tier stimuli: gratings, sparse flashing squares, binarised drifting noise."""
    out, t = np.empty((length, H, W), np.float32), 0
    yy, xx = np.mgrid[0:H, 0:W]
    while t < length:
        n, kind = min(length - t, int(rng.integers(30, 91))), int(rng.integers(3))
        contrast = rng.uniform(0.7, 1.0)
        if kind == 0:  # drifting sinusoidal grating
            theta, period = rng.uniform(0, np.pi), rng.uniform(8, 32)
            omega = 2 * np.pi * rng.uniform(0.5, 4.0) / FPS
            u = (xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period
            phase = rng.uniform(0, 2 * np.pi) + omega * np.arange(n)[:, None, None]
            seg = 127.5 + 127.5 * contrast * np.sin(u[None] - phase)
        elif kind == 1:  # sparse noise: black and white squares flashing on grey
            seg = np.full((n, H, W), 127.5)
            for _ in range(int(n * 0.6)):
                start, size = int(rng.integers(n)), int(rng.integers(4, 11))
                r, c = int(rng.integers(0, H - size)), int(rng.integers(0, W - size))
                level = 127.5 + 127.5 * contrast * rng.choice([-1.0, 1.0])
                seg[start:start + int(rng.integers(4, 11)), r:r + size, c:c + size] = level
        else:  # binarised pink noise: sharp edges, only two grey levels
            seg = 127.5 + 127.5 * contrast * np.sign(_pink_scene(rng, n))
        out[t:t + n] = seg
        t += n
    return out


def _clip_length(rng: np.random.Generator, frames: int) -> int:
    u = rng.random()
    if u < 0.7:
        return frames
    if u < 0.85:
        return int(rng.integers(int(np.ceil(0.8 * frames)), frames))
    return int(rng.integers(frames + 1, int(1.1 * frames) + 1))


def make_video(seed: int, key: tuple[str, int, int], frames: int) -> np.ndarray:
    """The clip of `key` = (pool, mouse or 0, index): (length, 36, 64) float32 in 0..255."""
    pool, mouse, index = key
    rng = _rng(seed, _VIDEO, _POOLS.index(pool), mouse, index)
    length = _clip_length(rng, frames)
    video = _ood_video(rng, length) if pool.endswith("bonus") else _natural_video(rng, length)
    return np.rint(np.clip(video, 0, 255)).astype(np.float32)


# ----------------------------------------------------------------------------- behaviour
def make_behavior(rng: np.random.Generator, video: np.ndarray, run_bias: float,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(2, L) [pupil dilation, running speed] and (2, L) pupil centre for one trial."""
    n = len(video)
    p_switch = 1.0 / (FPS * rng.uniform(2, 5, 2))  # dwell times of 2-5 s
    running, u = np.empty(n), rng.random(n)
    state = int(u[0] < run_bias)
    for t in range(n):
        running[t] = state
        state ^= int(u[t] < p_switch[state])
    speed = _smooth(running * rng.uniform(8, 25), 15) + rng.normal(0, 0.2, n)
    luminance = (video.mean(axis=(1, 2)) - 128.0) / 64.0
    pupil = (rng.uniform(11, 15) + 10 * _smooth(running, 30) - 3 * _smooth(luminance, 10)
             + 4 * _slow_noise(rng, n, 20))
    jumps = rng.random(n) < 1.0 / FPS  # about one saccade per second
    center = np.array([[220.0], [145.0]]) + np.cumsum(
        jumps * rng.normal(0, [[9.0], [5.0]], (2, n)), axis=1) * 0.6
    center += rng.normal(0, 0.5, (2, n))
    behavior = np.stack([pupil.clip(8, 30), speed.clip(-0.5, 25)])
    pupil_center = np.stack([center[0].clip(180, 260), center[1].clip(120, 170)])
    return behavior.astype(np.float32), pupil_center.astype(np.float32)


# ----------------------------------------------------------------------------- neurons
def _contrast_frames(video: np.ndarray) -> np.ndarray:
    """(L, 18 * 32): 2x2-averaged frames in contrast units, the receptive fields' input."""
    small = (video[:, 0::2, 0::2] + video[:, 1::2, 0::2]
             + video[:, 0::2, 1::2] + video[:, 1::2, 1::2])
    return ((small - 512.0) / 256.0).reshape(len(video), -1)


def make_neurons(seed: int, mouse: int, n: int, frames: int) -> dict:
    """One mouse's neurons: positions, receptive fields, kernels, gains, rates."""
    rng = _rng(seed, _MOUSE, mouse)
    p = PARAMETERS
    coords = np.stack([rng.uniform(0, 800, n), rng.uniform(0, 500, n), rng.uniform(180, 420, n)])
    # Retinotopy: RF centre (pixels) is an affine map of cortical position plus scatter.
    cx = rng.uniform(8, 14) + 40 * coords[0] / 800 + rng.normal(0, 2, n)
    cy = rng.uniform(4, 8) + 20 * coords[1] / 500 + rng.normal(0, 2, n)
    sigma, theta = rng.uniform(*p["rf_sigma_px"], n), rng.uniform(0, np.pi, n)
    period, phase = rng.uniform(*p["rf_period_px"], n), rng.uniform(0, 2 * np.pi, n)
    energy = rng.random(n) < p["energy_fraction"]
    gy, gx = np.mgrid[0.5:H:2.0, 0.5:W:2.0]  # pixel centres of the 2x2-averaged grid
    dy, dx = gy[None] - cy[:, None, None], gx[None] - cx[:, None, None]
    envelope = np.exp(-(dx**2 + dy**2) / (2 * sigma[:, None, None] ** 2))
    u = (dx * np.cos(theta)[:, None, None] + dy * np.sin(theta)[:, None, None])
    u = 2 * np.pi * u / period[:, None, None]
    filters = []
    for shift in (0.0, np.pi / 2):  # quadrature pair; linear cells use the first
        g = envelope * np.cos(u + phase[:, None, None] + shift)
        g -= envelope * (g.sum((1, 2)) / envelope.sum((1, 2)))[:, None, None]  # no DC response
        filters.append(g.reshape(n, -1) / np.linalg.norm(g.reshape(n, -1), axis=1, keepdims=True))
    lag = np.arange(_KERNEL_FRAMES)[None, :]
    tau = rng.uniform(*p["temporal_tau_frames"], n)[:, None]
    kernel = (lag / tau) ** 2 * np.exp(-lag / tau) - 0.4 * (lag / (1.8 * tau)) ** 2 * np.exp(
        -lag / (1.8 * tau))
    kernel /= np.linalg.norm(kernel, axis=1, keepdims=True)
    neurons = {
        "coords": coords.T.astype(np.float32), "center_x": cx, "center_y": cy, "sigma": sigma,
        "theta": theta, "period": period, "phase": phase, "energy": energy,
        "filters": np.concatenate(filters).T.astype(np.float32), "kernel": kernel, "tau": tau[:, 0],
        "a_run": rng.normal(0.35, 0.2, n), "a_pupil": rng.normal(0.2, 0.15, n),
        "threshold": rng.uniform(*p["threshold"], n),
        "events": np.exp(rng.uniform(*np.log(p["events_per_frame"]), n)),
        "amp_scale": rng.uniform(0.3, 1.0, n), "hidden_loading": rng.uniform(0.5, 1.5, n),
        "unit_ids": np.sort(rng.choice(np.arange(1, 20 * n + 100), n, replace=False)),
        "run_bias": rng.uniform(0.2, 0.6),
    }
    # Scale the drives to unit variance (energy: zero mean too) on natural clips.
    cal = _rng(seed, _CALIBRATION, mouse)
    proj = np.concatenate([_filtered(neurons, _contrast_frames(_natural_video(cal, frames)))
                           for _ in range(2)])
    lin, quad = proj[:, :n], np.hypot(proj[:, :n], proj[:, n:])
    neurons["drive_mean"] = np.where(energy, quad.mean(0), 0.0)
    neurons["drive_std"] = np.where(energy, quad.std(0), lin.std(0)) + 1e-6
    return neurons


def _filtered(neurons: dict, frames: np.ndarray) -> np.ndarray:
    """(L, 2n) Gabor projections convolved causally with each neuron's temporal kernel."""
    proj = frames @ neurons["filters"]
    kernel = np.tile(neurons["kernel"], (2, 1))
    out = np.zeros_like(proj)
    for k in range(_KERNEL_FRAMES):  # the screen is grey (0 contrast) before the trial
        out[k:] += kernel[:, k] * proj[: len(proj) - k]
    return out


def respond(neurons: dict, video: np.ndarray, behavior: np.ndarray, rng: np.random.Generator,
            ) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless rate and noisy responses, both (n, L) float32, for one trial."""
    n, length = len(neurons["energy"]), len(video)
    proj = _filtered(neurons, _contrast_frames(video))
    drive = np.where(neurons["energy"], np.hypot(proj[:, :n], proj[:, n:]), proj[:, :n])
    drive = (drive - neurons["drive_mean"]) / neurons["drive_std"]
    f = np.logaddexp(0, 2 * (drive - neurons["threshold"])) / 2  # soft rectification
    f = f / (1 + f / PARAMETERS["saturation"])
    pupil = (behavior[0] - 16.0) / 5.0
    gain = np.exp(np.outer(behavior[1] / 10.0, neurons["a_run"])
                  + np.outer(pupil, neurons["a_pupil"]))
    expected_events = (neurons["events"] * gain * f).T  # (n, L)
    shape = PARAMETERS["amplitude_gamma_shape"]
    mean_amp = shape * neurons["amp_scale"][:, None]
    rate = signal.lfilter(_DECONV_TAIL, [1.0], expected_events * mean_amp, axis=1)
    s = PARAMETERS["hidden_gain_sigma"] * neurons["hidden_loading"][:, None]
    z = _slow_noise(rng, length, 60)
    hidden = np.exp(s * z[None] - s**2 / 2)  # mean 1: the rate stays the expectation
    counts = rng.poisson(expected_events * hidden)
    events = rng.gamma(shape * counts, 1.0) * neurons["amp_scale"][:, None]
    noisy = signal.lfilter(_DECONV_TAIL, [1.0], events, axis=1)
    noisy = np.maximum(noisy + rng.normal(0, PARAMETERS["floor_noise_sd"], noisy.shape), 0.0)
    return rate.astype(np.float32), noisy.astype(np.float32)


# ----------------------------------------------------------------------------- layout
def tier_plan(seed: int, mouse: int, trials: int) -> list[tuple[str, tuple[str, int, int]]]:
    """(tier, clip key) per trial id: mostly train, repeated oracle clips, tests, a few none."""
    n_test, n_none = max(1, round(0.05 * trials)), max(1, round(0.03 * trials))
    repeats = int(np.clip(trials // 20, 2, 10))
    n_oracle = max(2, round(0.1 * trials / repeats))
    n_train = trials - 4 * n_test - n_none - n_oracle * repeats
    if n_train < 4:
        raise ValueError(f"{trials} trials per mouse are too few for every tier; use >= 20")
    n_shared = round(PARAMETERS["shared_train_fraction"] * n_train)
    own = mouse + 1  # pool index 0 is the clips every mouse sees
    slots = [("train", ("shared_train", 0, j)) for j in range(n_shared)]
    slots += [("train", ("own", own, j)) for j in range(n_train - n_shared)]
    slots += [("oracle", ("oracle", 0, j)) for j in range(n_oracle) for _ in range(repeats)]
    slots += [(tier, (tier, 0, j)) for tier in TEST_TIERS for j in range(n_test)]
    slots += [("none", ("own", own, n_train - n_shared + j)) for j in range(n_none)]
    # Trial ids are in random order with respect to tiers, as in the real data.
    return [slots[i] for i in _rng(seed, _PLAN, mouse).permutation(len(slots))]


def _pad(array: np.ndarray, length: int) -> np.ndarray:
    out = np.full(array.shape[:-1] + (length,), np.nan, np.float32)
    out[..., : array.shape[-1]] = array
    return out


class _Stats:
    """Running mean, std, min and max per array position over the valid frames of trials."""

    def __init__(self, shape: tuple[int, ...]):
        self.n, self.s, self.s2 = np.zeros(shape[-1]), np.zeros(shape), np.zeros(shape)
        self.lo, self.hi = np.full(shape, np.inf), np.full(shape, -np.inf)

    def add(self, x: np.ndarray) -> None:
        length = x.shape[-1]  # unpadded: frames beyond it are the NaN tail
        self.n[:length] += 1
        self.s[..., :length] += x
        self.s2[..., :length] += np.square(x, dtype=np.float64)
        np.minimum(self.lo[..., :length], x, out=self.lo[..., :length])
        np.maximum(self.hi[..., :length], x, out=self.hi[..., :length])

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.s / self.n
            std = np.sqrt(np.maximum(self.s2 / self.n - mean**2, 0.0))
        seen = self.n > 0
        for name, value in (("mean", mean), ("std", std), ("min", self.lo), ("max", self.hi)):
            np.save(folder / f"{name}.npy", np.where(seen, value, np.nan).astype(np.float32))


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row Pearson r, (x - mean) / (population std + 1e-8) as the metrics use."""
    a = (a - a.mean(1, keepdims=True)) / (a.std(1, keepdims=True) + 1e-8)
    b = (b - b.mean(1, keepdims=True)) / (b.std(1, keepdims=True) + 1e-8)
    return (a * b).mean(1)


def _write_mouse(root: Path, seed: int, m: int, name: str, n: int, trials: int, frames: int,
                 ) -> dict:
    folder, sim = root / name, root / SIMULATION_DIR
    neurons = make_neurons(seed, m, n, frames)
    plan = tier_plan(seed, m, trials)
    array_length = int(1.1 * frames) + 2 * (m % 3)  # the longest clip plus a few frames
    for d in [*(folder / "data" / x for x in MODALITIES), sim / "truth" / name,
              sim / "rate" / name]:
        d.mkdir(parents=True, exist_ok=True)
    shapes = {"videos": (H, W), "responses": (n,), "behavior": (2,), "pupil_center": (2,)}
    stats = {k: _Stats(s + (array_length,)) for k, s in shapes.items()}
    test: dict[str, list] = {"main": [], "bonus": []}
    lengths = []
    for trial_id, (tier, key) in enumerate(plan):
        video = make_video(seed, key, frames)
        rng = _rng(seed, _TRIAL, m, trial_id)
        behavior, pupil_center = make_behavior(rng, video, neurons["run_bias"])
        rate, noisy = respond(neurons, video, behavior, rng)
        arrays = {"videos": video.transpose(1, 2, 0), "responses": noisy,
                  "behavior": behavior, "pupil_center": pupil_center}
        if tier in TEST_TIERS:
            np.save(sim / "truth" / name / f"{trial_id}.npy", _pad(noisy, array_length))
            arrays["responses"] = np.zeros_like(noisy)  # the real new mice's dummy labels
            test[tier.rsplit("_", 1)[1]].append((rate, noisy))
        np.save(sim / "rate" / name / f"{trial_id}.npy", _pad(rate, array_length))
        for modality, array in arrays.items():
            np.save(folder / "data" / modality / f"{trial_id}.npy", _pad(array, array_length))
            if tier in ("train", "oracle"):
                stats[modality].add(array)
        lengths.append(len(video))
    for rel, value in (("trials/tiers", np.array([t for t, _ in plan], "<U16")),
                       ("neurons/unit_ids", neurons["unit_ids"].astype(np.int64)),
                       ("neurons/cell_motor_coordinates", neurons["coords"])):
        (folder / "meta" / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(folder / "meta" / f"{rel}.npy", value)
    for modality, stat in stats.items():
        stat.write(folder / "meta" / "statistics" / modality / "all")
    # Per neuron r(rate, response) over the concatenated test trials (each tier has some).
    ceiling = {part: _corr(*(np.concatenate(x, 1) for x in zip(*pairs, strict=True)))
               for part, pairs in (("all", test["main"] + test["bonus"]), *test.items())}
    rf = {k: np.round(neurons[k], 4).tolist()
          for k in ("center_x", "center_y", "sigma", "theta", "period", "phase", "tau",
                    "a_run", "a_pupil", "threshold", "events")}
    return {
        "name": name, "index": m, "neurons": n, "array_length": array_length,
        "tiers": {t: sum(1 for p, _ in plan if p == t) for t in TIERS},
        "cell_type": ["energy" if e else "linear" for e in neurons["energy"]],
        "receptive_fields": rf, "clip_lengths": lengths,
        "video_keys": ["/".join(map(str, key)) for _, key in plan],
        "_ceiling": ceiling,
    }


def generate(out_dir: str | os.PathLike, *, mice: int = DEFAULTS["mice"],
             neurons: int = DEFAULTS["neurons"], trials: int = DEFAULTS["trials"],
             frames: int = DEFAULTS["frames"], seed: int = 0) -> Path:
    """Writes a simulated dataset (mouse folders + `simulation/`) into `out_dir`.

    Args:
        out_dir: the dataset root; created, and must be empty if it exists.
        mice: number of mouse folders.
        neurons: neurons per mouse.
        trials: trials per mouse (>= 20), all tiers included.
        frames: nominal clip length; clips run 0.8x to 1.1x of it (>= 40).
        seed: every random draw derives from it; the same seed gives identical files.

    Returns:
        The root path.
    """
    root = Path(out_dir)
    if frames < 40 or mice < 1 or neurons < 2:
        raise ValueError("need frames >= 40 (every clip >= 32 frames), mice >= 1, neurons >= 2")
    tier_plan(seed, 0, trials)  # raises when there are too few trials for every tier
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: is not empty; generate writes into a fresh folder")
    infos = [_write_mouse(root, seed, m, name, neurons, trials, frames)
             for m, name in enumerate(mouse_names(mice))]
    ceiling = {"definition": (
        "per neuron Pearson r between the noiseless rate and the simulated response over all "
        "valid frames of the test trials of a mouse, concatenated; per mouse the mean over its "
        "neurons, overall the mean over all neurons"), "per_mouse": {}, "overall": {}}
    for part in ("all", "main", "bonus"):
        per_neuron = [info["_ceiling"][part] for info in infos]
        ceiling["overall"][part] = round(float(np.mean(np.concatenate(per_neuron))), 4)
        for info, r in zip(infos, per_neuron, strict=True):
            ceiling["per_mouse"].setdefault(info["name"], {})[part] = round(float(r.mean()), 4)
    for info in infos:
        del info["_ceiling"]
    meta = {"generator": "dwise_jax.data.synthetic", "format": 1, "seed": seed, "mice": mice,
            "neurons": neurons, "trials": trials, "frames": frames, "fps": FPS,
            "parameters": PARAMETERS, "noise_ceiling": ceiling, "mouse_info": infos}
    (root / SIMULATION_DIR / "simulation.json").write_text(json.dumps(meta, indent=1))
    return root


def load_info(root: str | os.PathLike) -> dict:
    """The simulation's parameters, per-mouse info and noise ceiling (simulation.json)."""
    return json.loads((Path(root) / SIMULATION_DIR / "simulation.json").read_text())


def load_truth(root: str | os.PathLike, mouse_name: str, trial_id: int, *,
               noiseless: bool = False) -> np.ndarray:
    """True responses of a trial, (neurons, T) float32 with the NaN tail.

    Test trials read the kept-aside file (their public file holds dummy zeros), other trials
    the public responses file; `noiseless=True` gives the expected response (the rate).
    """
    root, name = Path(root), f"{int(trial_id)}.npy"
    path = root / SIMULATION_DIR / ("rate" if noiseless else "truth") / mouse_name / name
    if not noiseless and not path.exists():
        path = root / mouse_name / "data" / "responses" / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: no simulated truth for this trial")
    return np.load(path, allow_pickle=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dwise_jax.data.synthetic",
                                     description="Write a simulated Sensorium 2023 dataset.")
    parser.add_argument("out_dir", type=Path)
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=int, default=value)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = generate(args.out_dir, mice=args.mice, neurons=args.neurons, trials=args.trials,
                    frames=args.frames, seed=args.seed)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    ceiling = load_info(root)["noise_ceiling"]["overall"]
    print(f"wrote {root} in {time.perf_counter() - start:.1f} s, {size / 2**20:.0f} MiB; "
          f"noise ceiling r = {ceiling['all']} (main {ceiling['main']}, bonus {ceiling['bonus']})")


if __name__ == "__main__":
    main()
