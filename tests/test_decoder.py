"""The linear decoder baseline of movie reconstruction (dwise_jax/decoder.py): the lagged design
by hand, recovery of a video that the responses encode linearly with a delay, and the fitting
trials of a fold group (never the reconstructed fold)."""

from __future__ import annotations

import numpy as np
import pytest

from dwise_jax import decoder, reconstruct, report
from dwise_jax.data import folds
from dwise_jax.data.sensorium import SensoriumDataset


def test_lagged_rows_read_the_responses_after_each_frame():
    z = np.arange(6, dtype=float).reshape(2, 3)  # neuron 0: 0 1 2, neuron 1: 3 4 5
    x = decoder.lagged(z, 2)
    np.testing.assert_array_equal(x, [[0, 3, 1, 4], [1, 4, 2, 5], [2, 5, 0, 0]])


def _delayed_encoding(trials: int, delay: int, seed: int):
    """Videos from 6 spatial patterns with white-noise time courses; 40 neurons respond to the
    pattern weights `delay` frames later, with noise."""
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(6, 36 * 64))
    mixing = rng.normal(size=(40, 6))
    pairs = []
    for _ in range(trials):
        weights = rng.normal(size=(50, 6))
        video = np.clip(127.5 + 12 * weights @ patterns, 0, 255).reshape(50, 36, 64)
        responses = np.zeros((40, 50))
        responses[:, delay:] = mixing @ weights[:-delay].T
        pairs.append((responses + 0.05 * rng.normal(size=responses.shape), video))
    return pairs


def _corr(a, b):
    return np.corrcoef(a.ravel(), b.ravel())[0, 1]


def test_the_decoder_recovers_a_delayed_linear_encoding():
    pairs = _delayed_encoding(12, delay=2, seed=0)
    mask = np.zeros((36, 64), bool)
    mask[8:28, 16:48] = True
    fit, test = pairs[:10], pairs[10:]  # held-out trials of the same encoding
    good = decoder.fit(fit, mask, lags=4)
    blind = decoder.fit(fit, mask, lags=1)  # sees only the frame's own time: no information
    assert good.lags == 4 and blind.lags == 1
    for responses, video in test:
        frames = slice(0, 48)  # the last `delay` frames have no response after them
        assert _corr(good.decode(responses)[frames][:, mask], video[frames][:, mask]) > 0.95
        assert abs(_corr(blind.decode(responses)[frames][:, mask],
                         video[frames][:, mask])) < 0.3
    with pytest.raises(ValueError, match="at least 2 fitting trials"):
        decoder.fit(pairs[:1], mask)


def test_features_are_capped_by_dropping_lags(monkeypatch):
    monkeypatch.setattr(decoder, "MAX_FEATURES", 80)
    pairs = _delayed_encoding(3, delay=1, seed=2)
    assert decoder.fit(pairs, np.ones((36, 64), bool), lags=8).lags == 2  # 80 // 40 neurons


def test_a_fold_groups_decoder_never_fits_on_its_fold(sim_root, monkeypatch):
    dataset = SensoriumDataset.open(sim_root)
    mouse = dataset.mice[0]
    seen = []
    real = report.load_target

    def spy(dataset, split, mouse, trial):
        seen.append(trial)
        return real(dataset, split, mouse, trial)

    monkeypatch.setattr(report, "load_target", spy)
    cfg = reconstruct.ReconConfig(decoder_lags=2, decoder_trials=1000)
    fitted = reconstruct.fit_decoder(dataset, mouse, {0}, np.ones((36, 64), bool), cfg)
    trial_fold = folds.trial_folds(mouse)
    expected = [t for t in range(mouse.num_trials)
                if trial_fold[t] > 0 and mouse.is_labeled(t)]
    assert seen == expected and fitted.lags == 2
    seen.clear()
    thinned = reconstruct.ReconConfig(decoder_lags=2, decoder_trials=3)
    reconstruct.fit_decoder(dataset, mouse, {0}, np.ones((36, 64), bool), thinned)
    assert len(seen) <= 3 and set(seen) <= set(expected)
    assert reconstruct.fit_decoder(dataset, mouse, {0}, np.ones((36, 64), bool),
                                   reconstruct.ReconConfig(decoder_lags=0)) is None
