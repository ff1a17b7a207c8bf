"""Parity with the original PyTorch DwiseNeuro on the two model fixtures in tests/fixtures.

The fixture state is mapped with `dwise_jax.convert.state_from_torch` (the converter's code), then
eval outputs, train-mode outputs, the loss, every gradient and the BatchNorm buffers after one
train-mode forward are compared with the fixture README's measure and tolerances.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_loss, fixture_model, fixture_state_dict, model_kwargs, rel_err
from flax import nnx

from dwise_jax.convert import LAYOUTS, ConversionError, state_from_torch, torch_name
from dwise_jax.models.dwiseneuro import DwiseNeuro


def state_to_torch(state: nnx.State) -> dict[str, np.ndarray]:
    """NNX state (parameters, BatchNorm statistics or gradients) -> the original's names and
    layouts: the inverse of convert.state_from_torch, through its name and layout tables."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        if (named := torch_name(path)) is not None:
            value = var.get_value() if isinstance(var, nnx.Variable) else var
            out[named[0]] = LAYOUTS[named[1]][1](np.asarray(value, dtype=np.float32))
    return out


def build_model(meta) -> DwiseNeuro:
    return DwiseNeuro(**model_kwargs(**meta["constructor_kwargs"]), rngs=nnx.Rngs(0))


def parity_errors(arrays, meta) -> dict[str, tuple[float, str]]:
    """Worst error (and its array) per category: eval, train, loss, grad, near_zero, buffer."""
    model = fixture_model(arrays, meta)
    x = jnp.asarray(arrays["input/x"]).transpose(0, 2, 3, 4, 1)  # NCTHW -> NTHWC
    n = len(meta["readout_index_to_neurons"])
    to_torch = lambda y: np.asarray(y).transpose(0, 2, 1)  # (batch, time, N) -> (batch, N, time)
    worst: dict[str, tuple[float, str]] = {}

    def record(category, err, name):
        if err >= worst.get(category, (-1.0, ""))[0]:
            worst[category] = (err, name)

    model.eval()
    outputs = nnx.jit(lambda m, x: m(x))(model, x)
    for i, y in enumerate(outputs):
        record("eval", rel_err(to_torch(y), arrays[f"output/eval/{i}"]), f"output/eval/{i}")
    single = nnx.jit(lambda m, x: m(x, readout_index=n - 1))(model, x)
    record("eval", rel_err(to_torch(single), arrays[f"output/eval/{n - 1}"]), "index form")

    model.train()
    targets = [jnp.asarray(arrays[f"input/targets/{i}"]).transpose(0, 2, 1) for i in range(n)]
    weights = jnp.asarray(arrays["input/mice_weights"])

    def loss_fn(m):
        outs = m(x)
        return fixture_loss(outs, targets, weights), outs

    train_step = nnx.jit(lambda m: nnx.value_and_grad(loss_fn, has_aux=True)(m))
    (loss, outputs), grads = train_step(model)
    for i, y in enumerate(outputs):
        record("train", rel_err(to_torch(y), arrays[f"output/train/{i}"]), f"output/train/{i}")
    record("loss", rel_err(loss, arrays["output/train/loss"]), "output/train/loss")

    grads = state_to_torch(grads)
    assert sorted(grads) == sorted(meta["param_names"])
    scale = meta["grad_scale"]
    for name, g in grads.items():
        ref = arrays[f"grad/{name}"]
        if name in meta["near_zero_grads"]:
            record("near_zero", float(np.max(np.abs(g - ref))) / scale, name)
        else:
            record("grad", rel_err(g, ref, scale), name)

    buffers = state_to_torch(nnx.state(model, nnx.BatchStat))
    expected = {k[len("output/train/buffer/"):] for k in arrays.files
                if k.startswith("output/train/buffer/") and "running" in k}
    assert set(buffers) == expected
    for name, b in buffers.items():
        err = rel_err(b, arrays[f"output/train/buffer/{name}"], meta["buffer_scale"])
        record("buffer", err, name)
    return worst


def check_parity(fixture):
    arrays, meta = fixture
    tol = meta["tolerances"]
    worst = parity_errors(arrays, meta)
    print({k: (f"{v[0]:.2e}", v[1]) for k, v in worst.items()})
    limits = {
        "eval": tol["outputs_rel"],
        "train": tol["outputs_rel"],
        "loss": tol["loss_rel"],
        "grad": tol["grads_rel"],
        "near_zero": tol["near_zero_grads_abs_over_grad_scale"],
        "buffer": tol["buffers_rel"],
    }
    failures = {k: worst[k] for k in limits if worst[k][0] >= limits[k]}
    assert not failures, f"beyond tolerance: {failures}"


def test_parity_small(small_model_fixture):
    check_parity(small_model_fixture)


def test_parity_full_core(full_core_fixture):
    check_parity(full_core_fixture)


def test_fixture_inv_freq_matches_recomputed(small_model_fixture, full_core_fixture):
    # The encoding is recomputed (the converter ignores the `inv_freq` buffers); the fixtures'
    # buffers agree to float32 rounding (EMA-averaged checkpoints differ by ~1e-5).
    for arrays, _ in (small_model_fixture, full_core_fixture):
        buffers = {k: v for k, v in fixture_state_dict(arrays).items() if k.endswith(".inv_freq")}
        assert buffers
        for value in buffers.values():
            ch = 2 * len(value)
            ref = 1.0 / 10000 ** (np.arange(0, ch, 2, dtype=np.float64) / ch)
            assert np.max(np.abs(np.asarray(value, np.float64) - ref) / ref) < 1e-6


def test_mapping_round_trip_and_errors(small_model_fixture):
    arrays, meta = small_model_fixture
    sd = fixture_state_dict(arrays)
    model = build_model(meta)
    state = state_from_torch(sd, nnx.state(model))
    back = state_to_torch(state)
    for name, value in back.items():
        np.testing.assert_array_equal(value, sd[name])
    # Abstract targets (nnx.eval_shape) work too: the converter needs no allocation first.
    abstract = nnx.eval_shape(lambda: build_model(meta))
    state = state_from_torch(sd, nnx.state(abstract))
    assert jax.tree.leaves(state)[0].dtype == jnp.float32

    bad = dict(sd)
    del bad["core.stem.0.weight"]
    bad["core.stem.9.weight"] = np.zeros(3, np.float32)
    bad["readouts.0.layer.1.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as info:
        state_from_torch(bad, nnx.state(model))
    message = str(info.value)
    assert "missing (1): ['core.stem.0.weight']" in message
    assert "unexpected (1): ['core.stem.9.weight']" in message
    assert "readouts.0.layer.1.bias: got (3,), expected (8,)" in message
