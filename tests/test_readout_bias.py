"""The optional readout-bias start at each neuron's mean response (configs/demo.py uses it)."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import model_kwargs
from flax import nnx

from dwise_jax import readout_bias
from dwise_jax.data.sensorium import SensoriumDataset
from dwise_jax.models.dwiseneuro import DwiseNeuro


def test_inverse_softplus_inverts_the_models_softplus():
    y = np.array([1e-3, 0.05, 0.26, 1.0, 9.9, 40.0])
    x = readout_bias.inverse_softplus(y, 0.07)
    np.testing.assert_allclose(np.log1p(np.exp(0.07 * x)) / 0.07, y, rtol=1e-9)
    # and the model's float32 softplus agrees to float32 precision
    np.testing.assert_allclose(np.asarray(jax.nn.softplus(0.07 * jnp.float32(x)) / 0.07), y,
                               rtol=1e-3)


def test_mean_response_biases_average_over_valid_frames_and_floor_silent_neurons():
    stat = np.array([[0.2, 0.4, np.nan], [0.0, 0.0, 0.0], [np.nan, np.nan, np.nan]], np.float32)
    biases = readout_bias.mean_response_biases(stat, 0.07)
    expected = readout_bias.inverse_softplus(np.array([0.3, 1e-3, 1e-3]), 0.07)
    np.testing.assert_allclose(biases, expected, rtol=1e-6)
    assert biases.dtype == np.float32


def test_biases_make_a_silent_readout_predict_each_neurons_mean_response(sim_root):
    dataset = SensoriumDataset.open(sim_root)
    model = DwiseNeuro(**model_kwargs(
        dataset.num_neurons, core_features=(8, 8), spatial_strides=(2, 2),
        cortex_features=(16, 32), expansion_ratio=2, se_reduce_ratio=4, drop_rate=0.0,
        drop_path_rate=0.0), rngs=nnx.Rngs(0))
    readout_bias.set_readout_biases(model, dataset, 0.07)
    model.eval()
    features = jnp.ones((1, 16, 32))
    for readout, mouse in zip(model.readouts, dataset.mice, strict=True):
        readout.kernel[...] = jnp.zeros_like(readout.kernel[...])
        expected = np.nanmean(np.load(mouse.path / "meta/statistics/responses/all/mean.npy"),
                              axis=1)
        out = np.asarray(readout(features))
        np.testing.assert_allclose(out[0, 3], np.maximum(expected, 1e-3), rtol=1e-4)
        # The even-count padding of the grouped readout keeps its zero bias.
        assert np.all(np.asarray(readout.bias[...][mouse.num_neurons:]) == 0)
