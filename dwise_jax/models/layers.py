"""Building blocks of DwiseNeuro, channels-last: video features `(batch, time, height, width,
channels)`, cortex features `(batch, time, channels)`. Parameters are float32, activations in the
compute dtype, BatchNorm statistics and softplus float32.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

Dtype = jnp.dtype | type
DEPTHWISE_IMPLS = ("auto", "taps", "lax")
NARROW = 256  # depthwise layers below this many channels take the narrow path (_depthwise_taps_fwd)


def conv_init(key: jax.Array, shape: Sequence[int], fan_out: int) -> jax.Array:
    """The original's init: N(0, sqrt(2 / fan_out)), fan_out = prod(kernel) * out / groups."""
    return jax.random.normal(key, tuple(shape), jnp.float32) * math.sqrt(2.0 / fan_out)


def _silu_grad(z: jax.Array) -> jax.Array:
    s = jax.nn.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, epsilon, silu):
    """Train-mode BatchNorm (+ SiLU): (y, batch mean, biased batch variance), float32 stats.
    The custom VJP keeps only x and per-channel vectors (autodiff kept three or four full-size
    intermediates per BatchNorm, which dominated the training step's memory)."""
    return _batch_norm_forward(x, scale, bias, epsilon, silu)[:3]


def _batch_norm_forward(x, scale, bias, epsilon, silu):
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - mean), axis=axes)
    inv = lax.rsqrt(var + epsilon)
    z = (xf - mean) * (inv * scale) + bias
    y = (nnx.silu(z) if silu else z).astype(x.dtype)
    return y, mean, var, inv


def _batch_norm_train_fwd(x, scale, bias, epsilon, silu):
    y, mean, var, inv = _batch_norm_forward(x, scale, bias, epsilon, silu)
    return (y, mean, var), (x, mean, inv, scale, bias)


def _batch_norm_train_bwd(epsilon, silu, residuals, cotangents):
    # The mean and variance outputs only feed the (stop-gradient) running statistics.
    x, mean, inv, scale, bias = residuals
    gy = cotangents[0].astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[:-1])
    xhat = (x.astype(jnp.float32) - mean) * inv
    dz = gy * _silu_grad(xhat * scale + bias) if silu else gy
    dbias = jnp.sum(dz, axis=axes)
    dscale = jnp.sum(dz * xhat, axis=axes)
    dx = (scale * inv) * (dz - dbias / n - xhat * (dscale / n))
    return dx.astype(x.dtype), dscale, dbias


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nnx.Module):
    """PyTorch's BatchNorm{1,3}d over every axis but the last, optionally fused with SiLU, in
    float32; PyTorch momentum 0.1 is `momentum=0.9` here (docs/original.md#batchnorm-momentum)."""

    momentum, epsilon = 0.9, 1e-5

    def __init__(self, num_features: int):
        self.use_running_average = False
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array, *, silu: bool = False) -> jax.Array:
        if self.use_running_average:
            inv = lax.rsqrt(self.var[...] + self.epsilon) * self.scale[...]
            z = (x.astype(jnp.float32) - self.mean[...]) * inv + self.bias[...]
            return (nnx.silu(z) if silu else z).astype(x.dtype)
        y, mean, var = _batch_norm_train(x, self.scale[...], self.bias[...], self.epsilon, silu)
        n = math.prod(x.shape[:-1])
        unbiased = lax.stop_gradient(var) * (n / max(n - 1, 1))
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1.0 - m) * lax.stop_gradient(mean)
        self.var[...] = m * self.var[...] + (1.0 - m) * unbiased
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by `nnx.view`."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


# Pointwise and grouped pointwise layers (einsums: no grouped convolutions, see openxla/xla#47945)


def pointwise(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """1x1(x1) convolution on the last axis: `(..., c_in) @ (c_in, c_out)`."""
    # A 2-D matmul: XLA:CPU runs the 5-D einsum's weight gradient about 3 times slower.
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.astype(x.dtype))
    y = y.reshape(*x.shape[:-1], kernel.shape[-1])
    return y if bias is None else y + bias.astype(x.dtype)


@jax.custom_vjp
def _grouped_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(groups, rows, c_in/g) @ (groups, c_in/g, c_out/g) -> (groups, rows, c_out/g)."""
    return lax.dot_general(x, kernel, (((2,), (1,)), ((0,), (0,))))


def _grouped_matmul_fwd(x, kernel):
    return _grouped_matmul(x, kernel), (x, kernel)


def _grouped_matmul_bwd(residuals, g):
    # Explicit operand layouts: left to autodiff, XLA:CPU ran the readouts' weight gradient
    # (a batched dot contracting over the leading rows) as a slow generic dot.
    x, kernel = residuals
    dx = lax.dot_general(g, kernel, (((2,), (2,)), ((0,), (0,))))
    dk = lax.dot_general(jnp.swapaxes(x, 1, 2), g, (((2,), (1,)), ((0,), (0,))))
    return dx, dk.astype(kernel.dtype)


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def split_groups(x: jax.Array, groups: int) -> jax.Array:
    """`(..., c)` -> `(groups, rows, c / groups)`, group k holding channels `k*c/g ..`."""
    return jnp.swapaxes(x.reshape(-1, groups, x.shape[-1] // groups), 0, 1)


def merge_groups(x: jax.Array, lead: tuple[int, ...]) -> jax.Array:
    """`(groups, rows, c / groups)` -> `(*lead, c)`: the inverse of `split_groups`."""
    return jnp.swapaxes(x, 0, 1).reshape(*lead, -1)


def grouped_pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Grouped 1x1 convolution in PyTorch's `groups=g` layout: `x` `(..., c_in)`, `kernel`
    `(g, c_in/g, c_out/g)` (group k reads channels `k*c_in/g ..`, writes `k*c_out/g ..`)."""
    y = _grouped_matmul(split_groups(x, kernel.shape[0]), kernel.astype(x.dtype))
    return merge_groups(y, x.shape[:-1])


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """Interleave the groups on the last axis: out[j*g + k] = in[k*(C/g) + j]."""
    c = x.shape[-1]
    x = x.reshape(*x.shape[:-1], groups, c // groups)
    return jnp.swapaxes(x, -1, -2).reshape(*x.shape[:-2], c)


def tile_channels(x: jax.Array, channels: int) -> jax.Array:
    """Cyclic channel tiling (not repeat): [0..C-1, 0..C-1, ...] cut to `channels`. Below 64
    channels an exact matmul with a 0/1 matrix, which XLA:CPU does not fuse into every shortcut
    (benchmarks/RESULTS.md, "The shortcuts' channel tiling")."""
    c = x.shape[-1]
    if c == channels:
        return x
    if c >= 64:
        return jnp.tile(x, (1,) * (x.ndim - 1) + (-(-channels // c),))[..., :channels]
    copies = np.arange(channels)[None, :] % c == np.arange(c)[:, None]
    return pointwise(x, jnp.asarray(copies, x.dtype))


def nearest_downsample(x: jax.Array, stride: int) -> jax.Array:
    """PyTorch nearest resize of (height, width) to ceil(size / stride): index floor(d*in/out),
    for even sizes x[:, :, ::s, ::s] (not jax.image.resize's half-pixel centres)."""
    if stride == 1:
        return x
    for axis in (2, 3):
        size = x.shape[axis]
        out = -(-size // stride)
        if size == out * stride:
            x = lax.slice_in_dim(x, 0, size, stride, axis=axis)
        else:
            index = np.floor(np.arange(out) * (size / out)).astype(np.int32)
            x = jnp.take(x, index, axis=axis)
    return x


# Depthwise 3-D convolutions, tap sums or XLA's grouped one (docs/design.md#depthwise-convolutions)


def resolve_impl(impl: str = "auto", backend: str | None = None) -> str:
    """"taps" or "lax": `impl` itself, or for "auto" "taps" on CPU (where XLA's grouped
    convolution is very slow) and "lax" on any other `backend` (default: JAX's default)."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(
            f"unknown depthwise implementation {impl!r}; expected one of {DEPTHWISE_IMPLS}")
    if impl != "auto":
        return impl
    return "taps" if (backend or jax.default_backend()) == "cpu" else "lax"


def _tap_sum(xp, kernel, strides):
    """sum over taps (a, b, c) of xp[:, a::st, b::sh, c::sw][:out] * kernel[a, b, c]: a valid
    (unpadded) depthwise correlation, accumulated in float32."""
    out = [(xp.shape[1 + d] - kernel.shape[d]) // strides[d] + 1 for d in range(3)]
    acc = None
    for tap in itertools.product(*map(range, kernel.shape[:3])):
        limit = [k + (o - 1) * s + 1 for k, o, s in zip(tap, out, strides, strict=True)]
        sliced = lax.slice(xp, (0, *tap, 0), (xp.shape[0], *limit, xp.shape[4]),
                           (1, *strides, 1))
        term = (sliced * kernel[tap]).astype(jnp.float32)
        acc = term if acc is None else acc + term
    return acc


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_taps(x, kernel, strides, padding):
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    return _tap_sum(xp, kernel, strides).astype(x.dtype)


def _depthwise_taps_fwd(x, kernel, strides, padding):
    # Below NARROW channels x is materialised once by an exact identity matmul: left alone,
    # XLA:CPU recomputes the preceding BatchNorm + SiLU inside the pad and inside every slice
    # of the backward. (The full model's layers, 448 channels and up, measured 0.94x with it.)
    if x.shape[-1] < NARROW:
        x = pointwise(x, jnp.asarray(np.eye(x.shape[-1]), x.dtype))
        if max(strides) > 1:  # the taps from the backward's phases: no full-size pad
            return _phase_taps(x, kernel, strides, padding), (x, kernel)
    return _depthwise_taps(x, kernel, strides, padding), (x, kernel)


def _tap_phase(tap, strides, padding):
    """(p, q), per axis tap - pad = q*s + p: the tap reads x[p::s] shifted by q."""
    qp = [divmod(k - padding[d][0], strides[d]) for d, k in enumerate(tap)]
    return tuple(r for _, r in qp), tuple(q for q, _ in qp)


def _phase_slice(x, p, strides):
    return x[:, p[0]::strides[0], p[1]::strides[1], p[2]::strides[2]]


def _phase_taps(x, kernel, strides, padding):
    """The strided tap sum from x[p::s] per phase, each tap's slice zero-filled at output size."""
    sizes, ks = x.shape[1:4], kernel.shape[:3]
    outs = [(sizes[d] + sum(padding[d]) - ks[d]) // strides[d] + 1 for d in range(3)]
    acc = None
    for tap in itertools.product(*map(range, ks)):
        p, q = _tap_phase(tap, strides, padding)
        xs = _phase_slice(x, p, strides)
        config = [(-q[d], outs[d] + q[d] - xs.shape[1 + d], 0) for d in range(3)]
        xs = lax.pad(xs, jnp.zeros((), x.dtype), [(0, 0, 0), *config, (0, 0, 0)])
        term = (xs * kernel[tap]).astype(jnp.float32)
        acc = term if acc is None else acc + term
    return acc.astype(x.dtype)


def _depthwise_taps_bwd(strides, padding, residuals, g):
    # dx is one transposed tap sum and dk one reduction per tap, materialising nothing
    # (autodiff kept every shifted slice alive and accumulated dx tap by tap).
    x, kernel = residuals
    sizes, outs, ks = x.shape[1:4], g.shape[1:4], kernel.shape[:3]
    # dx = correlation of the stride-dilated, padded g with the flipped kernel.
    config = [(0, 0, 0)]
    for d in range(3):
        lo = ks[d] - 1 - padding[d][0]
        hi = sizes[d] + ks[d] - 1 - lo - ((outs[d] - 1) * strides[d] + 1)
        config.append((lo, hi, strides[d] - 1))
    gp = lax.pad(g, jnp.zeros((), g.dtype), [*config, (0, 0, 0)])
    dx = _tap_sum(gp, kernel[::-1, ::-1, ::-1], (1, 1, 1)).astype(x.dtype)
    dk = jnp.zeros(kernel.shape, jnp.float32)
    if x.shape[-1] >= NARROW:  # dk[tap] = sum over o of x[o*s + tap - pad] * g[o]
        for tap in itertools.product(*map(range, ks)):
            xs, gs = x, g
            for d, k in enumerate(tap):
                first = max(0, -(-(padding[d][0] - k) // strides[d]))
                last = min(outs[d] - 1, (sizes[d] - 1 + padding[d][0] - k) // strides[d])
                start = first * strides[d] + k - padding[d][0]
                xs = lax.slice_in_dim(xs, start, start + max(0, (last - first) * strides[d] + 1),
                                      strides[d], axis=d + 1)
                gs = lax.slice_in_dim(gs, first, last + 1, axis=d + 1)
            dk = dk.at[tap].set(
                jnp.sum(xs.astype(jnp.float32) * gs.astype(jnp.float32), axis=(0, 1, 2, 3)))
        return dx, dk.astype(kernel.dtype)
    # Below NARROW channels, the same sum over i of phase[i] * g[i - q]: phase = x[p::s] and
    # tap - pad = q*s + p per axis, g shifted by q and zero-filled; x read once per phase.
    phases, shifted, gf = {}, {}, g.astype(jnp.float32)
    for tap in itertools.product(*map(range, ks)):
        p, q = _tap_phase(tap, strides, padding)
        if p not in phases:
            phases[p] = _phase_slice(x, p, strides)
        ph, key = phases[p], (p, q)
        if key not in shifted:
            config = [(q[d], ph.shape[1 + d] - outs[d] - q[d], 0) for d in range(3)]
            shifted[key] = lax.pad(gf, jnp.zeros((), gf.dtype), [(0, 0, 0), *config, (0, 0, 0)])
        dk = dk.at[tap].set(jnp.sum(ph.astype(jnp.float32) * shifted[key], axis=(0, 1, 2, 3)))
    return dx, dk.astype(kernel.dtype)


_depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)


def depthwise_conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1, 1),
                     padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0), (0, 0)),
                     impl: str = "auto") -> jax.Array:
    """Depthwise 3-D convolution with explicit, symmetric zero padding (PyTorch
    `groups=channels`): `x` `(batch, time, height, width, channels)`, `kernel`
    `(kt, kh, kw, channels)` in the compute dtype, `impl` "taps", "lax" or "auto"."""
    impl, strides = resolve_impl(impl), tuple(strides)
    padding = tuple(tuple(p) for p in padding)
    if impl == "taps":
        return _depthwise_taps(x, kernel, strides, padding)
    return lax.conv_general_dilated(
        x, kernel[:, :, :, None, :], window_strides=strides, padding=padding,
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), feature_group_count=x.shape[-1])


class SqueezeExcite(nnx.Module):
    """Mean over (time, height, width) -> 1x1 reduce + SiLU -> 1x1 expand + sigmoid -> gate."""

    def __init__(self, channels: int, reduced: int, *, rngs: nnx.Rngs):
        self.reduce_kernel = nnx.Param(conv_init(rngs.params(), (channels, reduced), reduced))
        self.reduce_bias = nnx.Param(jnp.zeros((reduced,), jnp.float32))
        self.expand_kernel = nnx.Param(conv_init(rngs.params(), (reduced, channels), channels))
        self.expand_bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2, 3), keepdims=True, dtype=jnp.float32).astype(x.dtype)
        s = nnx.silu(pointwise(s, self.reduce_kernel[...], self.reduce_bias[...]))
        s = nnx.sigmoid(pointwise(s, self.expand_kernel[...], self.expand_bias[...]))
        return x * s


class _SampleDropout(nnx.Module):
    """Zeroes parts of each sample (`mask_shape`) with probability `rate` and scales the rest by
    1 / (1 - rate), in training only."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate, self.deterministic = rate, False
        self.rngs = rngs["dropout"].fork() if rate > 0 else nnx.data(None)

    def draw_mask(self, x: jax.Array) -> jax.Array | None:
        """The keep mask (True = kept) that `self(x)` would apply, drawn from the same stream;
        None when nothing is dropped (evaluation, or rate 0)."""
        if self.deterministic or self.rate == 0.0:
            return None
        return jax.random.bernoulli(self.rngs(), 1.0 - self.rate, self.mask_shape(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        mask = self.draw_mask(x)
        return x if mask is None else apply_dropout_mask(x, mask, self.rate)

    def set_view(self, deterministic: bool | None = None):
        """Used by `nnx.view`."""
        if deterministic is not None:
            self.deterministic = deterministic


def apply_dropout_mask(x: jax.Array, mask: jax.Array, rate: float) -> jax.Array:
    """x / (1 - rate) where `mask` keeps, 0 elsewhere (`mask` broadcasts against x)."""
    return jnp.where(mask, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class DropPath(_SampleDropout):
    """Stochastic depth: a per-sample Bernoulli(1 - rate) mask scaled by 1 / (1 - rate)."""

    def mask_shape(self, x: jax.Array) -> tuple[int, ...]:
        return (x.shape[0],) + (1,) * (x.ndim - 1)


class ChannelDropout(_SampleDropout):
    """PyTorch Dropout1d on `(batch, time, channels)`: whole channels dropped for all time
    steps, one mask per sample (shape `(batch, 1, channels)`), scaled by 1 / (1 - rate)."""

    def mask_shape(self, x: jax.Array) -> tuple[int, ...]:
        return (x.shape[0], 1, x.shape[-1])


def softplus(x: jax.Array, beta: float, threshold: float = 20.0) -> jax.Array:
    """PyTorch Softplus(beta, threshold) in float32: log(1 + exp(beta*x)) / beta, and x itself
    where beta*x > threshold."""
    x = x.astype(jnp.float32)
    bx = beta * x
    return jnp.where(bx > threshold, x, jax.nn.softplus(bx) / beta)
