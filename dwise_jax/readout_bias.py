"""An optional start for the readout biases: each neuron's mean response instead of zero.

Zero biases start every prediction at log(2) / 0.07 ~ 9.9, far above the responses; short runs
(configs/demo.py, `readout_bias_init = "response_mean"`) start at the neurons' mean responses.
"""

from __future__ import annotations

import warnings

import numpy as np

from dwise_jax.data.sensorium import SensoriumDataset

MIN_MEAN_RESPONSE = 1e-3  # below it the inverse softplus runs off to large negative values


def inverse_softplus(y: np.ndarray, beta: float) -> np.ndarray:
    """x with softplus_beta(x) = log(1 + exp(beta * x)) / beta = y, for y > 0."""
    return np.log(np.expm1(beta * np.asarray(y, np.float64))) / beta


def mean_response_biases(mean_statistic: np.ndarray, beta: float) -> np.ndarray:
    """(neurons,) float32 biases from a (neurons, frames) mean statistic (NaN tail allowed)."""
    with warnings.catch_warnings():  # an all-NaN row (no data) is floored below
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(np.asarray(mean_statistic, np.float64), axis=1)
    mean = np.where(np.isfinite(mean), mean, MIN_MEAN_RESPONSE)
    return inverse_softplus(np.maximum(mean, MIN_MEAN_RESPONSE), beta).astype(np.float32)


def set_readout_biases(model, dataset: SensoriumDataset, beta: float) -> None:
    """Sets each readout's first `neurons` biases (the even-count padding stays 0) in place."""
    for readout, mouse in zip(model.readouts, dataset.mice, strict=True):
        biases = mean_response_biases(mouse.response_mean(), beta)
        readout.bias[...] = readout.bias[...].at[: len(biases)].set(biases)
