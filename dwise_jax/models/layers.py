"""Building blocks of DwiseNeuro, channels-last: video features `(batch, time, height, width,
channels)`, cortex features `(batch, time, channels)`. Parameters are float32, activations in the
compute dtype, BatchNorm statistics and softplus float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

Dtype = jnp.dtype | type
NARROW = 256  # layers below this many channels take the narrow paths (BatchNorm, depthwise.py)


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


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _pointwise_batch_norm(x, kernel, scale, bias, epsilon, silu):
    """Train-mode BatchNorm(+ SiLU) of pointwise(x, kernel), (y, mean, var) as
    `_batch_norm_train`, for narrow inputs: the statistics come from x's channel means and
    covariance (no passes over the wider x @ kernel), the normalisation folded into the kernel."""
    return _pointwise_batch_norm_fwd(x, kernel, scale, bias, epsilon, silu)[0]


def _pointwise_batch_norm_fwd(x, kernel, scale, bias, epsilon, silu):
    # x is centred first: a covariance from uncentred sums loses the variance of inputs far from
    # zero (raw pixels and behaviour at the stem) to round-off.
    n, f32 = math.prod(x.shape[:-1]), jnp.float32
    mx = jnp.mean(x.reshape(n, -1), axis=0, dtype=f32)
    xc = (x.reshape(n, -1) - mx).astype(x.dtype)
    cov = lax.dot_general(xc, xc, (((0,), (0,)), ((), ())), preferred_element_type=f32) / n
    mean, var = mx @ kernel, jnp.maximum(jnp.sum(kernel * (cov @ kernel), axis=0), 0.0)
    inv = lax.rsqrt(var + epsilon)
    # The residual is the dot's output: XLA fuses the bias and SiLU into their consumers.
    z = jnp.dot(xc, (kernel * (scale * inv)).astype(x.dtype))
    u = z + bias.astype(x.dtype)
    y = (nnx.silu(u) if silu else u).reshape(*x.shape[:-1], -1)
    return (y, mean, var), (xc, kernel, scale, bias, z if silu else None, cov, inv)


def _pointwise_batch_norm_bwd(epsilon, silu, residuals, cotangents):
    # With zhat = xc @ W * inv: sum(du * zhat) = inv * diag(W^T xc^T du), x^T dz = xc^T dz
    # (dz sums to zero) and zhat @ W^T = xc @ W diag(inv) W^T: every full-size pass reads xc or du.
    xc, kernel, scale, bias, z, cov, inv = residuals
    n, f32, dt = xc.shape[0], jnp.float32, xc.dtype
    g = cotangents[0]
    du = g.reshape(n, -1).astype(f32)
    if silu:
        z = lax.optimization_barrier(z)  # no CSE with the forward's sigmoid
        du = du * _silu_grad((z + bias.astype(dt)).astype(f32))
    dbias = jnp.sum(du, axis=0)
    du = du.astype(dt)
    mc = lax.dot_general(xc, du, (((0,), (0,)), ((), ())), preferred_element_type=f32)
    dscale = inv * jnp.sum(kernel * mc, axis=0)
    a = scale * inv
    dkernel = a * (mc - (cov @ kernel) * inv * dscale)
    dx = (jnp.dot(du, (kernel * a).T.astype(dt), preferred_element_type=f32)
          - jnp.dot(xc, ((kernel * (inv * a * dscale / n)) @ kernel.T).astype(dt),
                    preferred_element_type=f32)
          - (a * dbias / n) @ kernel.T)
    return dx.astype(dt).reshape(*g.shape[:-1], -1), dkernel, dscale, dbias


_pointwise_batch_norm.defvjp(_pointwise_batch_norm_fwd, _pointwise_batch_norm_bwd)


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

    def __call__(self, x: jax.Array, *, silu: bool = False,
                 kernel: jax.Array | None = None) -> jax.Array:
        """BN(x), or with `kernel` BN(pointwise(x, kernel)) (below NARROW outputs in training,
        one fused op that never materialises the pointwise output)."""
        if kernel is not None:
            if self.use_running_average or kernel.shape[-1] >= NARROW:
                x = pointwise(x, kernel)
            else:
                y, mean, var = _pointwise_batch_norm(x, kernel, self.scale[...], self.bias[...],
                                                     self.epsilon, silu)
                self._update(mean, var, math.prod(x.shape[:-1]))
                return y
        if self.use_running_average:
            inv = lax.rsqrt(self.var[...] + self.epsilon) * self.scale[...]
            z = (x.astype(jnp.float32) - self.mean[...]) * inv + self.bias[...]
            return (nnx.silu(z) if silu else z).astype(x.dtype)
        y, mean, var = _batch_norm_train(x, self.scale[...], self.bias[...], self.epsilon, silu)
        self._update(mean, var, math.prod(x.shape[:-1]))
        return y

    def _update(self, mean, var, n):
        """Running statistics <- momentum * running + (1 - momentum) * batch (unbiased var)."""
        unbiased = lax.stop_gradient(var) * (n / max(n - 1, 1))
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1.0 - m) * lax.stop_gradient(mean)
        self.var[...] = m * self.var[...] + (1.0 - m) * unbiased

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
