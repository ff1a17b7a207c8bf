"""The depthwise implementation per backend: "taps" and "lax" give the same model, "auto" picks
the tap sum on CPU, and the config field reaches the model, model.json and back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_loss, fixture_model, gradient_errors, model_kwargs, rel_err
from flax import nnx

from dwise_jax import checkpoint
from dwise_jax import config as config_lib
from dwise_jax.models.depthwise import resolve_impl
from dwise_jax.models.dwiseneuro import DwiseNeuro


def _run(arrays, meta, impl: str):
    """Eval outputs, train-mode outputs, loss and gradients of the fixture model."""
    model = fixture_model(arrays, meta, depthwise_impl=impl)
    x = jnp.asarray(arrays["input/x"]).transpose(0, 2, 3, 4, 1)  # NCTHW -> NTHWC
    n = len(meta["readout_index_to_neurons"])
    model.eval()
    eval_out = nnx.jit(lambda m, x: m(x))(model, x)
    model.train()
    targets = [jnp.asarray(arrays[f"input/targets/{i}"]).transpose(0, 2, 1) for i in range(n)]
    weights = jnp.asarray(arrays["input/mice_weights"])

    def loss_fn(m):
        outs = m(x)
        return fixture_loss(outs, targets, weights), outs

    (loss, train_out), grads = nnx.jit(
        lambda m: nnx.value_and_grad(loss_fn, has_aux=True)(m))(model)
    return eval_out, train_out, loss, nnx.to_pure_dict(grads)


def test_taps_and_lax_give_the_same_model(small_model_fixture):
    arrays, meta = small_model_fixture
    taps, lax = _run(arrays, meta, "taps"), _run(arrays, meta, "lax")
    for a, b in zip(taps[0] + taps[1], lax[0] + lax[1], strict=True):
        assert rel_err(a, b) < 1e-5
    assert rel_err(taps[2], lax[2]) < 1e-5
    # Against the largest gradient of any leaf: some gradients are zero in exact arithmetic
    # (conftest.gradient_errors).
    errors = gradient_errors(taps[3], lax[3])
    worst = max(errors, key=errors.get)
    print(f"worst gradient error {errors[worst]:.2e} ({worst})")
    assert errors[worst] < 1e-4, (worst, errors[worst])
    # The gradients are not all zero, and the depthwise kernels' own are among those compared.
    assert any("spatial_kernel" in k for k in errors)
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(taps[3])) > 0


def test_auto_is_the_tap_sum_on_cpu():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto") == "taps"
    assert resolve_impl("auto", "gpu") == "lax" and resolve_impl("auto", "tpu") == "lax"
    assert resolve_impl("lax") == "lax" and resolve_impl("taps", "gpu") == "taps"
    with pytest.raises(ValueError, match="unknown depthwise implementation 'cudnn'"):
        resolve_impl("cudnn")
    with pytest.raises(ValueError, match="unknown depthwise implementation"):
        DwiseNeuro(**model_kwargs((3,), core_features=(8,), spatial_strides=(1,),
                                  depthwise_impl="fast"), rngs=nnx.Rngs(0))


def test_config_field_is_validated_and_reaches_model_json(tmp_path):
    config = config_lib.get_base_config()
    assert config.model.depthwise_impl == "auto"
    config.model.depthwise_impl = "cudnn"
    with pytest.raises(config_lib.ConfigError, match="model.depthwise_impl must be auto, taps"):
        config_lib.validate(config)
    config.model.depthwise_impl = "lax"
    config_lib.validate(config)
    kwargs = config_lib.model_kwargs(config, [5, 7])
    assert kwargs["depthwise_impl"] == "lax"
    spec = checkpoint.ModelSpec(constructor=kwargs, mice=["a", "b"], source="test")
    checkpoint.write_model_spec(tmp_path, spec)
    assert checkpoint.read_model_spec(tmp_path) == spec
    small = dict(core_features=(8,), spatial_strides=(1,), expansion_ratio=2, se_reduce_ratio=2,
                 cortex_features=(16,))
    model = DwiseNeuro(**{**kwargs, **small}, rngs=nnx.Rngs(0))
    assert model.depthwise_impl == "lax"
    assert {b.depthwise_impl for b in model.core.blocks} == {"lax"}
    # A fold folder whose model.json was written before the field existed still loads: the
    # missing setting takes the config's default ("auto"), the stored ones stay.
    old = {k: v for k, v in {**kwargs, **small}.items() if k != "depthwise_impl"}
    checkpoint.write_model_spec(tmp_path, checkpoint.ModelSpec(constructor=old, mice=["a", "b"],
                                                               source="older"))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    checkpoint.save(tmp_path, 1, {"ema": jax.tree.map(np.asarray, {
        "params": params, "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))})})
    loaded, spec, _ = checkpoint.load_ema_model(tmp_path)
    assert "depthwise_impl" not in spec.constructor
    assert loaded.depthwise_impl == "auto"
    assert {b.depthwise_impl for b in loaded.core.blocks} == {"auto"}
    for a, b in zip(jax.tree.leaves(params),
                    jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded, nnx.Param))), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
