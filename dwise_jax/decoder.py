"""A linear decoder of the video from lagged responses: the baseline for movie reconstruction.

Ridge regression from the z-scored responses at frames t .. t + lags - 1 (a response follows
its stimulus) to every pixel of frame t, the penalty chosen on a held-out fifth of the fitting
trials, features capped at MAX_FEATURES by dropping lags (docs/insilico.md#movie-reconstruction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_FEATURES = 16384
ALPHA_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # times the mean eigenvalue


@dataclass(frozen=True)
class RidgeDecoder:
    lags: int
    mean: np.ndarray  # (N,) response mean of the fitting trials
    std: np.ndarray  # (N,)
    x_mean: np.ndarray  # (F,) feature means
    y_mean: np.ndarray  # (36 * 64,) pixel means
    weights: np.ndarray  # (F, 36 * 64)
    alpha: float

    def decode(self, responses: np.ndarray) -> np.ndarray:
        """(N, L) responses -> (L, 36, 64) float32 video on the 0..255 scale."""
        x = lagged((responses - self.mean[:, None]) / self.std[:, None], self.lags)
        y = self.y_mean + (x - self.x_mean) @ self.weights
        return np.clip(y, 0, 255).reshape(len(x), 36, 64).astype(np.float32)


def lagged(z: np.ndarray, lags: int) -> np.ndarray:
    """(N, L) -> (L, N * lags): row t holds z[:, t], z[:, t + 1], ... (zeros past the end)."""
    n, length = z.shape
    x = np.zeros((length, n * lags), np.float64)
    for d in range(lags):
        x[: length - d, d * n:(d + 1) * n] = z[:, d:].T
    return x


def _stack(pairs, lags, mean, std):
    xs = [lagged((r - mean[:, None]) / std[:, None], lags) for r, _ in pairs]
    ys = [v.reshape(len(v), -1).astype(np.float64) for _, v in pairs]
    return np.concatenate(xs), np.concatenate(ys)


def _solve(x, y, alphas):
    """(x mean, y mean, {alpha: ridge weights}): one eigendecomposition for every alpha."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    values, vectors = np.linalg.eigh(xc.T @ xc)
    projected = vectors.T @ (xc.T @ (y - y_mean))
    scale = max(float(values.mean()), 1e-12)
    fits = {a: vectors @ (projected / (values + a * scale)[:, None]) for a in alphas}
    return x_mean, y_mean, fits


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of all the elements of a and b; 0 where either is constant."""
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def fit(pairs: list[tuple[np.ndarray, np.ndarray]], score_mask: np.ndarray, lags: int = 8,
        seed: int = 0) -> RidgeDecoder:
    """Fits on [(responses (N, L), video (L, 36, 64))] of the fitting trials."""
    if len(pairs) < 2:
        raise ValueError(f"the linear decoder needs at least 2 fitting trials, got {len(pairs)}")
    n = pairs[0][0].shape[0]
    lags = max(1, min(lags, MAX_FEATURES // n))
    allr = np.concatenate([r for r, _ in pairs], axis=1).astype(np.float64)
    mean, std = allr.mean(1), np.maximum(allr.std(1), 1e-6)
    order = np.random.default_rng(seed).permutation(len(pairs))
    held = max(1, len(pairs) // 5)
    x, y = _stack([pairs[i] for i in order[held:]], lags, mean, std)
    xv, yv = _stack([pairs[i] for i in order[:held]], lags, mean, std)
    x_mean, y_mean, fits = _solve(x, y, ALPHA_GRID)
    pixels = np.asarray(score_mask, bool).ravel()
    scores = {a: correlation((y_mean + (xv - x_mean) @ w)[:, pixels], yv[:, pixels])
              for a, w in fits.items()}
    alpha = max(scores, key=scores.get)  # refitted on all the fitting trials
    x_mean, y_mean, fits = _solve(np.concatenate([x, xv]), np.concatenate([y, yv]), (alpha,))
    return RidgeDecoder(lags, mean, std, x_mean, y_mean, fits[alpha], alpha)
