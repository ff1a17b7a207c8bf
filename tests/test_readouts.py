"""Each sample's own readout only (`DwiseNeuro.own_readouts`) gives the loss, gradients and eval
predictions of running all readouts and masking, dropout included; so does the train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import gradient_errors, model_kwargs, stream_config
from flax import nnx

from dwise_jax import losses, train_step
from dwise_jax.data import pipeline
from dwise_jax.data.sensorium import SensoriumDataset
from dwise_jax.models.dwiseneuro import DwiseNeuro
from dwise_jax.models.grouped_readouts import bucket_sizes

# Two core blocks (what is compared is the readouts' path); dropout as configured.
TINY = dict(core_features=(4, 8), spatial_strides=(4, 2), expansion_ratio=1, se_reduce_ratio=2,
            cortex_features=(16, 32))


def test_bucket_sizes():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(4) == (1, 2, 3, 4)
    assert bucket_sizes(7) == (1, 2, 3, 4, 6, 7)
    assert bucket_sizes(32) == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def test_gradient_measure_bounds_round_off_absolutely_and_catches_real_errors():
    # A leaf that is zero in exact arithmetic holds round-off of different sign and size in the
    # two trees: leaf-relative that is an error of 2, in conftest's measure a negligible one.
    want = {"kernel": np.array([4.0, -16.0, 2.0]), "bias": np.array([3e-6, -1e-6])}
    got = {"kernel": want["kernel"] * (1 + 1e-7), "bias": np.array([-3e-6, 2e-6])}
    errors = gradient_errors(got, want)
    assert errors["['bias']"] == pytest.approx(6e-6 / 0.16)
    assert errors["['kernel']"] == pytest.approx(16e-7 / 16)
    # A real mistake still shows: 1% off on a large leaf, or a wrongly non-zero near-zero leaf.
    assert gradient_errors({**got, "kernel": want["kernel"] * 1.01}, want)["['kernel']"] > 1e-3
    assert gradient_errors({**got, "bias": np.array([0.05, 0.0])}, want)["['bias']"] > 0.1


def _batch(counts, mouse, rng):
    batch, width = len(mouse), max(counts)
    targets = np.zeros((batch, 16, width), np.float32)
    neuron_mask = np.zeros((batch, width), bool)
    for b, m in enumerate(mouse):
        targets[b, :, : counts[m]] = rng.uniform(0, 2, size=(16, counts[m]))
        neuron_mask[b, : counts[m]] = True
    return jnp.asarray(targets), jnp.asarray(neuron_mask)


def _split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_own_readouts_equal_all_readouts_masked(dtype):
    # Mouse 2 has no sample, mouse 1 four (a bucket of 4), odd counts, dropout 0.4 on.
    counts, mouse = (5, 9, 3, 7), np.array([1, 3, 1, 0, 1, 3, 1])
    rng = np.random.default_rng(0)
    model = DwiseNeuro(**model_kwargs(counts, **TINY), dtype=dtype,
                       rngs=nnx.Rngs(params=0, dropout=1))
    model.train()
    graphdef, params, rest = _split(model)
    x = jnp.asarray(rng.normal(size=(len(mouse), 16, 16, 16, 5)), jnp.float32)
    targets, neuron_mask = _batch(counts, mouse, rng)
    mouse = jnp.asarray(mouse)

    def loss_all(params):
        m = nnx.merge(graphdef, params, rest)
        return losses.own_mouse_loss(m(x), targets, mouse)

    def loss_needed(params):
        m = nnx.merge(graphdef, params, rest)
        return losses.own_readout_loss(m.own_readouts(m.features(x), mouse), targets,
                                       neuron_mask)

    value_all, grads_all = jax.jit(jax.value_and_grad(loss_all))(params)
    value_needed, grads_needed = jax.jit(jax.value_and_grad(loss_needed))(params)
    rtol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert float(value_needed) == pytest.approx(float(value_all), rel=rtol)
    # Several BatchNorm biases here have a zero gradient in exact arithmetic: compare in the
    # measure that bounds those absolutely (conftest.gradient_errors), never leaf-relative.
    errors = gradient_errors(grads_needed, grads_all)
    limit = 1e-4 if dtype == jnp.float32 else 3e-2
    worst = max(errors, key=errors.get)
    assert errors[worst] < limit, (worst, errors[worst])
    # The readout of the mouse without samples gets an exactly zero gradient either way.
    np.testing.assert_array_equal(np.asarray(grads_needed["readouts"][2]["kernel"]), 0.0)


def test_own_readouts_equal_readout_rows_in_eval_mode():
    counts = (4, 6, 5)
    model = DwiseNeuro(**model_kwargs(counts, **TINY), rngs=nnx.Rngs(0))
    model.eval()
    x = jax.random.normal(jax.random.key(1), (5, 16, 16, 16, 5))
    mouse = np.array([2, 0, 2, 2, 1])

    @nnx.jit
    def both(model, x, mouse):  # (each sample's own readout, every readout of every sample)
        features = model.features(x)
        return model.own_readouts(features, mouse), [r(features) for r in model.readouts]

    own, rows = both(model, x, jnp.asarray(mouse))
    for b, m in enumerate(mouse):
        row = np.asarray(rows[int(m)])[b]
        np.testing.assert_allclose(own[b, :, : counts[m]], row, rtol=1e-5, atol=1e-5)
        assert not own[b, :, counts[m]:].any()


@pytest.mark.parametrize("iter_size", [1, 2])
def test_train_step_needed_equals_all(sim_root, iter_size):
    dataset = SensoriumDataset.open(sim_root)
    with pipeline.TrainStream(dataset, stream_config(
            seed=5, batch_size=8, train_epoch_size=24, cutmix_prob=0.5), fold=0) as stream:
        batch = next(stream)
    results = {}
    for readouts in ("all", "needed"):
        model = DwiseNeuro(**model_kwargs(dataset.num_neurons, **TINY),
                           rngs=nnx.Rngs(params=0, dropout=1))
        trainer = train_step.Trainer(model, optax.sgd(1e-2), ema_decay=0.9, iter_size=iter_size,
                                     readouts=readouts)
        state, metrics = jax.jit(trainer.train_step)(trainer.init_state(), batch)
        results[readouts] = (float(metrics["loss"]), jax.device_get(state["params"]))
    assert results["needed"][0] == pytest.approx(results["all"][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(results["all"][1]), jax.tree.leaves(results["needed"][1]),
                    strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
