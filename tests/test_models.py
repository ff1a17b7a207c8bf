"""Unit tests of the DwiseNeuro layers and model against small NumPy / PyTorch references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import model_kwargs
from flax import nnx

from dwise_jax.models import dwiseneuro, layers
from dwise_jax.models.depthwise import depthwise_conv3d
from dwise_jax.models.dwiseneuro import DwiseNeuro, parameter_shares
from dwise_jax.models.layers import (
    BatchNorm,
    ChannelDropout,
    DropPath,
    channel_shuffle,
    grouped_pointwise,
    nearest_downsample,
    softplus,
    tile_channels,
)

NEURONS = (7863, 7908, 8202, 7939, 8122, 7440, 7928, 8285, 7671, 7495)
SMALL = dict(core_features=(16, 16, 32, 32), spatial_strides=(2, 1, 2, 1), expansion_ratio=3,
             se_reduce_ratio=4, cortex_features=(64, 128))


def test_parameter_counts_true_batch_and_distillation():
    shares = parameter_shares(**model_kwargs(NEURONS, expansion_ratio=7))
    assert shares["total"] == 170_656_070
    assert shares["stem"] == 448
    assert shares["core_blocks"] == 3_672_956
    assert shares["core"] == 3_673_404
    assert shares["cortex"] == 5_402_624
    assert [shares[f"cortex_layer_{j}"] for j in range(3)] == [135_168, 1_056_768, 4_210_688]
    assert shares["readouts"] == 161_580_042
    blocks = [79_566] * 3 + [108_494] + [298_908] * 2 + [414_108] + [1_156_920] * 2
    assert [shares[f"block_{i}"] for i in range(9)] == blocks
    assert sum(2049 * math.ceil(n / 2) * 2 for n in NEURONS) == shares["readouts"]

    shares = parameter_shares(**model_kwargs(NEURONS, expansion_ratio=6))
    assert shares["total"] == 170_058_402
    assert shares["core_blocks"] == 3_075_288
    assert shares["core"] == 3_075_736


def test_nearest_downsample_matches_torch():
    for size in (8, 9, 64):
        x = np.random.default_rng(0).normal(size=(1, 2, size, size, 3)).astype(np.float32)
        out = np.asarray(nearest_downsample(jnp.asarray(x), 2))
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 4, 1, 2, 3), size=(2, -(-size // 2), -(-size // 2)),
            mode="nearest",
        ).permute(0, 2, 3, 4, 1).numpy()
        np.testing.assert_array_equal(out, ref)
        if size % 2 == 0:
            np.testing.assert_array_equal(out, x[:, :, ::2, ::2])
    x = jnp.ones((1, 2, 5, 5, 3))
    assert nearest_downsample(x, 1) is x


def test_positional_encoding_layout():
    t, h, w, c = 4, 3, 5, 64
    pe = dwiseneuro.positional_encoding_3d(t, h, w, c)
    assert pe.shape == (t, h, w, c) and pe.dtype == np.float32
    ch = 22  # ceil(64 / 6) * 2
    f = 10000.0 ** (-np.arange(0, ch, 2) / ch)
    for i in range(t):
        for j in range(h):
            for k in range(w):
                full = np.concatenate(
                    [np.sin(i * f), np.cos(i * f), np.sin(j * f), np.cos(j * f),
                     np.sin(k * f), np.cos(k * f)]
                )
                np.testing.assert_allclose(pe[i, j, k], full[:c], atol=1e-6)
    assert dwiseneuro.pe_frequencies(128).shape == (22,)
    assert dwiseneuro.pe_frequencies(256).shape == (43,)


def test_channel_shuffle_matches_torch_view_transpose():
    x = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)  # (batch, time, channels)
    ref = torch.from_numpy(x).permute(0, 2, 1).reshape(2, 2, 4, 3).transpose(1, 2)
    ref = ref.reshape(2, 8, 3).permute(0, 2, 1).numpy()
    np.testing.assert_array_equal(np.asarray(channel_shuffle(jnp.asarray(x), 2)), ref)
    assert list(np.asarray(channel_shuffle(jnp.arange(8.0), 2))) == [0, 4, 1, 5, 2, 6, 3, 7]


def test_tile_channels_is_cyclic():
    x = jnp.arange(3.0)[None]
    assert list(np.asarray(tile_channels(x, 7))[0]) == [0, 1, 2, 0, 1, 2, 0]
    assert list(np.asarray(tile_channels(x, 6))[0]) == [0, 1, 2, 0, 1, 2]
    assert tile_channels(x, 3) is x
    # Exact (it is a matmul with a 0/1 matrix) for any values, and its gradient adds the copies.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6, 3)).astype(np.float32) * np.float32(1e6) ** rng.integers(-2, 3)
    w = rng.normal(size=(4, 6, 8)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(tile_channels(jnp.asarray(x), 8)),
                                  np.tile(x, (1, 1, 3))[..., :8])
    grad = jax.grad(lambda x: jnp.sum(tile_channels(x, 8) * w))(jnp.asarray(x))
    expected = w[..., 0:3] + w[..., 3:6] + np.pad(w[..., 6:8], ((0, 0), (0, 0), (0, 1)))
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6, atol=1e-6)


def test_softplus_threshold_branch():
    beta = 0.07
    x = np.array([-400.0, -30.0, -1.0, 0.0, 5.0, 285.0, 285.8, 286.0, 300.0, 1e4], np.float32)
    ref = torch.nn.functional.softplus(torch.from_numpy(x), beta=beta, threshold=20).numpy()
    out = np.asarray(softplus(jnp.asarray(x), beta))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    above = x * beta > 20
    np.testing.assert_array_equal(out[above], x[above])
    assert softplus(jnp.ones(2, jnp.bfloat16), beta).dtype == jnp.float32


def test_grouped_pointwise_matches_torch_conv1d():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)
    w = rng.normal(size=(6, 4, 1)).astype(np.float32)  # (out, in/groups, 1), groups 2
    ref = torch.nn.functional.conv1d(torch.from_numpy(x).permute(0, 2, 1), torch.from_numpy(w),
                                     groups=2).permute(0, 2, 1).numpy()
    kernel = w[:, :, 0].reshape(2, 3, 4).transpose(0, 2, 1)
    out = grouped_pointwise(jnp.asarray(x), jnp.asarray(kernel))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    f = lambda x, k: jnp.sum(jnp.sin(grouped_pointwise(x, k)))
    ref_f = lambda x, k: jnp.sum(jnp.sin(jnp.einsum(
        "btgi,gio->btgo", x.reshape(2, 5, 2, 4), k).reshape(2, 5, 6)))
    for a, b in zip(jax.grad(f, (0, 1))(x, kernel), jax.grad(ref_f, (0, 1))(x, kernel),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, kernel, strides, padding",
    [
        ((2, 4, 9, 8, 6), (1, 3, 3), (1, 2, 2), ((0, 0), (1, 1), (1, 1))),
        ((1, 3, 7, 11, 4), (1, 3, 3), (1, 2, 2), ((0, 0), (1, 1), (1, 1))),
        ((1, 2, 7, 6, 256), (1, 3, 3), (1, 2, 2), ((0, 0), (1, 1), (1, 1))),  # layers.NARROW
        ((2, 4, 8, 8, 6), (1, 3, 3), (1, 1, 1), ((0, 0), (1, 1), (1, 1))),
        ((2, 7, 3, 4, 6), (5, 1, 1), (1, 1, 1), ((2, 2), (0, 0), (0, 0))),
    ],
)
def test_depthwise_taps_match_grouped_conv(shape, kernel, strides, padding):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(*kernel, shape[-1])).astype(np.float32))
    taps = lambda x, k: depthwise_conv3d(x, k, strides, padding, impl="taps")
    grouped = lambda x, k: depthwise_conv3d(x, k, strides, padding, impl="lax")
    np.testing.assert_allclose(taps(x, k), grouped(x, k), rtol=1e-5, atol=1e-5)
    # The PyTorch layout agrees too: Conv3d(groups=C) on NCTHW.
    w = np.array(k).transpose(3, 0, 1, 2)[:, None]
    ref = torch.nn.functional.conv3d(
        torch.from_numpy(np.array(x)).permute(0, 4, 1, 2, 3), torch.from_numpy(w),
        stride=strides, padding=tuple(p[0] for p in padding), groups=shape[-1],
    ).permute(0, 2, 3, 4, 1).numpy()
    np.testing.assert_allclose(taps(x, k), ref, rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.normal(size=ref.shape).astype(np.float32))
    # Under differentiation the input passes an identity matmul first (materialised once),
    # exact like tile_channels' 0/1 matmul: training's forward is evaluation's.
    trained = jax.jit(lambda x, k: jax.vjp(taps, x, k)[0])
    np.testing.assert_allclose(trained(x, k), jax.jit(taps)(x, k), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.vjp(taps, x, k)[1](g), jax.vjp(grouped, x, k)[1](g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_batch_norm_matches_torch_train_and_eval():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(2, 3, 4, 4, 5)).astype(np.float32)
    bn = BatchNorm(5)
    bn.scale[...] = jnp.asarray(rng.normal(size=5).astype(np.float32))
    bn.bias[...] = jnp.asarray(rng.normal(size=5).astype(np.float32))
    ref = torch.nn.BatchNorm3d(5)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.asarray(bn.scale[...])))
        ref.bias.copy_(torch.from_numpy(np.asarray(bn.bias[...])))
    xt = torch.from_numpy(x).permute(0, 4, 1, 2, 3)
    for _ in range(2):  # train mode: batch statistics, running stats with unbiased variance
        y_ref = ref.train()(xt).permute(0, 2, 3, 4, 1).detach().numpy()
        np.testing.assert_allclose(np.asarray(bn(jnp.asarray(x))), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), ref.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), ref.running_var.numpy(), rtol=1e-6)
    bn.eval()
    y_ref = ref.eval()(xt).permute(0, 2, 3, 4, 1).detach().numpy()
    np.testing.assert_allclose(np.asarray(bn(jnp.asarray(x))), y_ref, rtol=1e-5, atol=1e-5)
    # The custom VJP of the fused BatchNorm + SiLU agrees with plain autodiff.
    xj, scale, bias = jnp.asarray(x), bn.scale[...], bn.bias[...]

    def plain(x, scale, bias):
        mean = jnp.mean(x, axis=(0, 1, 2, 3))
        var = jnp.var(x, axis=(0, 1, 2, 3))
        return jax.nn.silu((x - mean) / jnp.sqrt(var + 1e-5) * scale + bias)

    fused = lambda x, s, b: layers._batch_norm_train(x, s, b, 1e-5, True)[0]
    g = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    np.testing.assert_allclose(fused(xj, scale, bias), plain(xj, scale, bias), atol=1e-5)
    for a, b in zip(jax.vjp(fused, xj, scale, bias)[1](g), jax.vjp(plain, xj, scale, bias)[1](g),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("silu", [True, False])
def test_pointwise_batch_norm_matches_torch(silu):
    """BatchNorm(x, kernel=W) below NARROW outputs: the fused op (statistics from x's Gram
    matrix) against PyTorch's 1x1 matmul + BatchNorm (+ SiLU) with autograd."""
    rng = np.random.default_rng(3)
    # Off-centre channels, as the stem's pixels and behaviour: uncentred sums would lose them.
    offset = np.float32([3.0, 100.0, 300.0, -50.0, 0.0])
    x = (rng.normal(0.0, 2.0, size=(2, 3, 4, 4, 5)) + offset).astype(np.float32)
    w = rng.normal(0.0, 0.5, size=(5, 12)).astype(np.float32)
    g = rng.normal(size=(2, 3, 4, 4, 12)).astype(np.float32)
    bn = BatchNorm(12)
    bn.scale[...] = jnp.asarray(rng.normal(1.0, 0.3, size=12).astype(np.float32))
    bn.bias[...] = jnp.asarray(rng.normal(size=12).astype(np.float32))
    scale, bias = bn.scale[...], bn.bias[...]
    y = bn(jnp.asarray(x), silu=silu, kernel=jnp.asarray(w))
    fused = lambda *a: layers._pointwise_batch_norm(*a, bn.epsilon, silu)[0]
    y_vjp, vjp = jax.vjp(fused, jnp.asarray(x), jnp.asarray(w), scale, bias)
    np.testing.assert_array_equal(np.asarray(y_vjp), np.asarray(y))
    ref = torch.nn.BatchNorm3d(12).double()  # float64: the reference's own round-off aside
    tensors = [torch.tensor(np.asarray(a, np.float64), requires_grad=True)
               for a in (x, w, scale, bias)]
    with torch.no_grad():
        ref.weight.copy_(tensors[2])
        ref.bias.copy_(tensors[3])
    z = (tensors[0] @ tensors[1]).permute(0, 4, 1, 2, 3)
    z = torch.nn.functional.batch_norm(z, ref.running_mean, ref.running_var, tensors[2],
                                       tensors[3], training=True)
    y_ref = (torch.nn.functional.silu(z) if silu else z).permute(0, 2, 3, 4, 1)
    np.testing.assert_allclose(np.asarray(y), y_ref.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), ref.running_mean.numpy(), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(bn.var[...]), ref.running_var.numpy(), rtol=1e-4)
    y_ref.backward(torch.from_numpy(g.astype(np.float64)))
    for ours, theirs in zip(vjp(jnp.asarray(g)), tensors, strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_channel_dropout_drops_whole_channels():
    drop = ChannelDropout(0.4, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((64, 16, 256))
    y = np.asarray(drop(x))
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.6)}
    assert np.all(y == y[:, :1, :])  # same mask for every time step
    assert not np.all(y == y[:1])  # a different mask per sample
    assert abs((y == 0).mean() - 0.4) < 0.02
    drop.eval()
    assert drop(x) is x


def test_drop_path_is_per_sample():
    drop = DropPath(0.5, rngs=nnx.Rngs(dropout=0))
    y = np.asarray(drop(jnp.ones((256, 2, 3, 3, 4))))
    per_sample = y.reshape(256, -1)
    assert np.all(per_sample == per_sample[:, :1])
    assert set(np.unique(per_sample)) == {0.0, 2.0}
    drop.eval()
    assert np.all(np.asarray(drop(jnp.ones((4, 2)))) == 1.0)
    assert DropPath(0.0, rngs=nnx.Rngs(0))(jnp.ones(3)) is not None


def test_drop_path_rates_follow_the_original():
    model = DwiseNeuro(**model_kwargs((5, 3), **SMALL, drop_rate=0.4, drop_path_rate=0.1),
                       rngs=nnx.Rngs(0))
    assert [b.drop_path.rate for b in model.core.blocks] == [0.1 * i / 4 for i in range(4)]
    assert [layer.drop_path.rate for layer in model.cortex.layers] == [0.1, 0.1]
    assert [r.dropout.rate for r in model.readouts] == [0.4, 0.4]


def test_model_api_features_and_readouts():
    model = DwiseNeuro(**model_kwargs((5, 3), **SMALL), rngs=nnx.Rngs(0))
    model.eval()
    x = jax.random.normal(jax.random.key(0), (2, 16, 64, 64, 5))

    @nnx.jit  # one program: eager, each op of the model would compile on its own
    def run(model, x):
        features = model.features(x)
        return model(x), features, model.readouts[1](features), model(x, readout_index=0)

    outputs, features, second, first = run(model, x)
    assert [o.shape for o in outputs] == [(2, 16, 5), (2, 16, 3)]
    assert all(o.dtype == jnp.float32 and bool(jnp.all(o >= 0)) for o in outputs)
    assert features.shape == (2, 16, 128)
    np.testing.assert_allclose(second, outputs[1], rtol=1e-6)
    np.testing.assert_allclose(first, outputs[0], rtol=1e-6)


def test_canvas_rows_crops_the_middle_rows_of_the_input():
    kwargs = model_kwargs((5,), **SMALL)
    full = DwiseNeuro(**kwargs, rngs=nnx.Rngs(0))
    cropped = DwiseNeuro(**{**kwargs, "canvas_rows": 36}, rngs=nnx.Rngs(0))
    assert jax.tree.all(jax.tree.map(jnp.array_equal, nnx.state(full, nnx.Param),
                                         nnx.state(cropped, nnx.Param)))
    x = jax.random.normal(jax.random.key(0), (2, 16, 64, 64, 5))  # no zero rows: any row counts
    out = nnx.jit(lambda full, cropped, x: (cropped(x, 0), full(x[:, :, 14:50], 0), full(x, 0)))
    for model in (full, cropped):
        model.eval()
    on_crop, on_video_rows, on_canvas = out(full, cropped, x)
    np.testing.assert_allclose(on_crop, on_video_rows, rtol=1e-5, atol=1e-6)  # rows 14..49
    assert float(jnp.max(jnp.abs(on_crop - on_canvas))) > 1e-3  # the other rows mattered


def test_fresh_init_follows_the_original():
    model = DwiseNeuro(**model_kwargs((5, 3), **SMALL), rngs=nnx.Rngs(0))
    readout = model.readouts[0]
    assert readout.kernel.shape == (2, 64, 3) and readout.bias.shape == (6,)
    assert float(jnp.max(jnp.abs(readout.bias[...]))) == 0.0
    big = DwiseNeuro(**model_kwargs((4000,), **SMALL), rngs=nnx.Rngs(1))
    std = float(jnp.std(big.readouts[0].kernel[...]))
    assert abs(std - math.sqrt(4 / 4000)) / math.sqrt(4 / 4000) < 0.02
    block = big.core.blocks[0]
    assert abs(float(jnp.std(block.expand_kernel[...])) - math.sqrt(2 / 48)) < 0.03
    assert float(block.expand_bn.scale[...].min()) == 1.0


def test_bfloat16_forward_is_close_to_float32():
    kwargs = model_kwargs((5, 3), **SMALL, drop_rate=0.0, drop_path_rate=0.0)
    f32 = DwiseNeuro(**kwargs, rngs=nnx.Rngs(0))
    bf16 = DwiseNeuro(**kwargs, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, 64, 64, 5))
    for model in (f32, bf16):
        model.train()
    ref, out, features = nnx.jit(lambda f32, bf16, x: (f32(x), bf16(x), bf16.features(x)))(
        f32, bf16, x)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16, nnx.BatchStat)))
    for a, b in zip(out, ref, strict=True):
        assert a.dtype == jnp.float32
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 0.1
    assert features.dtype == jnp.bfloat16
