"""An optional start for the readout biases: each neuron's mean response instead of zero.

The original's zero biases start every prediction at log(2) / 0.07 ~ 9.9, far above real and
simulated responses; short CPU runs (configs/demo.py, `readout_bias_init = "response_mean"`)
start where softplus returns the mean of `meta/statistics/responses/all/mean.npy` instead.
"""

from __future__ import annotations

import warnings

import numpy as np

from dwise_jax.data.sensorium import SensoriumDataset

# Below this mean response the inverse softplus runs off to large negative values.
MIN_MEAN_RESPONSE = 1e-3


def inverse_softplus(y: np.ndarray, beta: float) -> np.ndarray:
    """x with softplus_beta(x) = log(1 + exp(beta * x)) / beta = y, for y > 0."""
    y = np.asarray(y, np.float64)
    return np.log(np.expm1(beta * y)) / beta


def mean_response_biases(mean_statistic: np.ndarray, beta: float) -> np.ndarray:
    """(neurons,) float32 biases from a (neurons, frames) mean statistic (NaN tail allowed)."""
    with warnings.catch_warnings():  # an all-NaN row (no data) is floored below
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(np.asarray(mean_statistic, np.float64), axis=1)
    mean = np.where(np.isfinite(mean), mean, MIN_MEAN_RESPONSE)
    return inverse_softplus(np.maximum(mean, MIN_MEAN_RESPONSE), beta).astype(np.float32)


def set_readout_biases(model, dataset: SensoriumDataset, beta: float) -> None:
    """Sets each mouse's readout bias (its first `neurons` entries; the even-count padding
    stays 0) to the inverse softplus of the neurons' mean responses, in place."""
    for readout, mouse in zip(model.readouts, dataset.mice, strict=True):
        biases = mean_response_biases(mouse.response_mean(), beta)
        readout.bias[...] = readout.bias[...].at[: len(biases)].set(biases)
