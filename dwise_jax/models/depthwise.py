"""Depthwise 3-D convolutions, channels-last: tap sums with a hand-written VJP (on CPU, where
XLA's grouped convolution is very slow) or XLA's grouped convolution
(docs/design.md#depthwise-convolutions)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dwise_jax.models.layers import NARROW, pointwise

DEPTHWISE_IMPLS = ("auto", "taps", "lax")


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
