"""The simulated V1 behind `dwise_jax.data.synthetic` (model: docs/data.md#the-simulated-v1).

Every draw comes from `random_stream(seed, purpose, ...)`, so the order in which clips, mice
and trials are generated never changes a value.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

from dwise_jax.data.sensorium import TEST_TIERS, VIDEO_HEIGHT, VIDEO_WIDTH

FPS = 30
H, W = VIDEO_HEIGHT, VIDEO_WIDTH
_CANVAS = (48, 96)  # pink noise is periodic on this canvas; the 36 x 64 crop rarely shows it
_PURPOSES = ("video", "mouse", "trial", "plan", "calibration")
# Clip pools of `make_video`'s keys; the pool's index is part of the clip's random stream.
_POOLS = ("shared_train", "oracle", *TEST_TIERS, "own")
_KERNEL_FRAMES = 12
_DECONV_TAIL = np.array([1.0, 0.35, 0.12])  # event smearing left by imperfect deconvolution
PARAMETERS = {
    "energy_fraction": 0.4, "shared_train_fraction": 0.3, "rf_sigma_px": [3.0, 6.0],
    "rf_period_px": [8.0, 20.0], "temporal_tau_frames": [1.2, 2.5], "threshold": [0.0, 1.0],
    "saturation": 3.0, "events_per_frame": [0.15, 0.6], "amplitude_gamma_shape": 2.0,
    "hidden_gain_sigma": 0.25, "floor_noise_sd": 0.02, "deconvolution_tail": _DECONV_TAIL.tolist(),
}


def random_stream(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """The generator of one `purpose` (video, mouse, trial, plan, calibration) and its keys."""
    return np.random.default_rng([seed, _PURPOSES.index(purpose), *keys])


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


def _scenes(rng: np.random.Generator, length: int, scene) -> np.ndarray:
    """(length, H, W) float32 of `scene(rng, n)` segments, a scene cut every 1 to 3 s."""
    out, t = np.empty((length, H, W), np.float32), 0
    while t < length:
        n = min(length - t, int(rng.integers(30, 91)))
        out[t:t + n] = scene(rng, n)
        t += n
    return out


def _natural_scene(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(90, 160) + rng.uniform(20, 45) * _pink_scene(rng, n)


def _ood_scene(rng: np.random.Generator, n: int) -> np.ndarray:
    """Bonus-tier stimuli: gratings, sparse flashing squares, binarised drifting noise."""
    kind, contrast = int(rng.integers(3)), rng.uniform(0.7, 1.0)
    if kind == 0:  # drifting sinusoidal grating
        yy, xx = np.mgrid[0:H, 0:W]
        theta, period = rng.uniform(0, np.pi), rng.uniform(8, 32)
        omega = 2 * np.pi * rng.uniform(0.5, 4.0) / FPS
        u = (xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period
        phase = rng.uniform(0, 2 * np.pi) + omega * np.arange(n)[:, None, None]
        return 127.5 + 127.5 * contrast * np.sin(u[None] - phase)
    if kind == 1:  # sparse noise: black and white squares flashing on grey
        seg = np.full((n, H, W), 127.5)
        for _ in range(int(n * 0.6)):
            start, size = int(rng.integers(n)), int(rng.integers(4, 11))
            r, c = int(rng.integers(0, H - size)), int(rng.integers(0, W - size))
            level = 127.5 + 127.5 * contrast * rng.choice([-1.0, 1.0])
            seg[start:start + int(rng.integers(4, 11)), r:r + size, c:c + size] = level
        return seg
    return 127.5 + 127.5 * contrast * np.sign(_pink_scene(rng, n))  # binarised: sharp edges


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
    rng = random_stream(seed, "video", _POOLS.index(pool), mouse, index)
    length = _clip_length(rng, frames)
    video = _scenes(rng, length, _ood_scene if pool.endswith("bonus") else _natural_scene)
    return np.rint(np.clip(video, 0, 255)).astype(np.float32)


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


def _contrast_frames(video: np.ndarray) -> np.ndarray:
    """(L, 18 * 32): 2x2-averaged frames in contrast units, the receptive fields' input."""
    small = (video[:, 0::2, 0::2] + video[:, 1::2, 0::2]
             + video[:, 0::2, 1::2] + video[:, 1::2, 1::2])
    return ((small - 512.0) / 256.0).reshape(len(video), -1)


def make_neurons(seed: int, mouse: int, n: int, frames: int) -> dict:
    """One mouse's neurons: positions, receptive fields, kernels, gains, rates."""
    rng = random_stream(seed, "mouse", mouse)
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
    cal = random_stream(seed, "calibration", mouse)
    clips = [_contrast_frames(_scenes(cal, frames, _natural_scene)) for _ in range(2)]
    proj = np.concatenate([_filtered(neurons, clip) for clip in clips])
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
