"""Depthwise 3-D convolution, channels-last, behind one function (`depthwise_conv3d`).

"taps": a sum of shifted, strided slices times per-channel weights, with a hand-written VJP;
"lax": XLA's grouped convolution. "auto" takes "taps" on CPU, where XLA's grouped convolution
is very slow, and "lax" elsewhere (docs/design.md#depthwise-convolutions).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "taps", "lax")
# What "auto" means on each backend; any backend not named here gets "lax".
AUTO_IMPL = {"cpu": "taps"}


def resolve_impl(impl: str = "auto", backend: str | None = None) -> str:
    """"taps" or "lax": `impl` itself, or for "auto" the choice for `backend` (default: JAX's
    default backend). Raises ValueError for any other name."""
    if impl not in IMPLS:
        raise ValueError(f"unknown depthwise implementation {impl!r}; expected one of {IMPLS}")
    if impl != "auto":
        return impl
    return AUTO_IMPL.get(backend or jax.default_backend(), "lax")


def _tap_sum(xp, kernel, strides):
    """sum over taps (a, b, c) of xp[:, a::st, b::sh, c::sw][:out] * kernel[a, b, c]: a valid
    (unpadded) depthwise correlation, accumulated in float32."""
    out = [(xp.shape[1 + d] - kernel.shape[d]) // strides[d] + 1 for d in range(3)]
    acc = None
    for a in range(kernel.shape[0]):
        for b in range(kernel.shape[1]):
            for c in range(kernel.shape[2]):
                start = (0, a, b, c, 0)
                limit = (
                    xp.shape[0],
                    a + (out[0] - 1) * strides[0] + 1,
                    b + (out[1] - 1) * strides[1] + 1,
                    c + (out[2] - 1) * strides[2] + 1,
                    xp.shape[4],
                )
                tap = lax.slice(xp, start, limit, (1, *strides, 1))
                term = (tap * kernel[a, b, c]).astype(jnp.float32)
                acc = term if acc is None else acc + term
    return acc


def _valid_range(size, out, k, stride, pad):
    """Output positions o with 0 <= o*stride + k - pad < size, as (first, count)."""
    first = max(0, -(-(pad - k) // stride))
    last = min(out - 1, (size - 1 + pad - k) // stride)
    return first, max(0, last - first + 1)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_taps(x, kernel, strides, padding):
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    return _tap_sum(xp, kernel, strides).astype(x.dtype)


def _depthwise_taps_fwd(x, kernel, strides, padding):
    return _depthwise_taps(x, kernel, strides, padding), (x, kernel)


def _depthwise_taps_bwd(strides, padding, residuals, g):
    # Plain autodiff of the tap sum keeps every shifted slice alive for the backward pass and
    # accumulates dx tap by tap; here dx is one transposed tap sum and dk reads x and g once
    # per tap, without materialising anything.
    x, kernel = residuals
    sizes, outs, ks = x.shape[1:4], g.shape[1:4], kernel.shape[:3]
    # dx = correlation of the stride-dilated, padded g with the flipped kernel.
    config = [(0, 0, 0)]
    for d in range(3):
        lo = ks[d] - 1 - padding[d][0]
        hi = sizes[d] + ks[d] - 1 - lo - ((outs[d] - 1) * strides[d] + 1)
        config.append((lo, hi, strides[d] - 1))
    config.append((0, 0, 0))
    gp = lax.pad(g, jnp.zeros((), g.dtype), config)
    dx = _tap_sum(gp, kernel[::-1, ::-1, ::-1], (1, 1, 1)).astype(x.dtype)
    # dk[a, b, c] = sum over batch and output positions of x[o*s + k - p] * g[o].
    dk = jnp.zeros(kernel.shape, jnp.float32)
    for a in range(ks[0]):
        for b in range(ks[1]):
            for c in range(ks[2]):
                xs, gs = x, g
                for d, k in enumerate((a, b, c)):
                    first, count = _valid_range(sizes[d], outs[d], k, strides[d], padding[d][0])
                    start = first * strides[d] + k - padding[d][0]
                    xs = lax.slice_in_dim(
                        xs, start, start + (count - 1) * strides[d] + 1, strides[d], axis=d + 1
                    )
                    gs = lax.slice_in_dim(gs, first, first + count, axis=d + 1)
                tap = jnp.sum(xs.astype(jnp.float32) * gs.astype(jnp.float32), axis=(0, 1, 2, 3))
                dk = dk.at[a, b, c].set(tap)
    return dx, dk.astype(kernel.dtype)


_depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)


def _depthwise_lax(x, kernel, strides, padding):
    channels = x.shape[-1]
    return lax.conv_general_dilated(
        x,
        kernel[:, :, :, None, :],
        window_strides=strides,
        padding=padding,
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        feature_group_count=channels,
    )


def depthwise_conv3d(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int] = (1, 1, 1),
    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0), (0, 0)),
    impl: str = "auto",
) -> jax.Array:
    """Depthwise 3-D convolution with explicit zero padding (PyTorch `groups=channels`).

    Args:
      x: `(batch, time, height, width, channels)`.
      kernel: `(kt, kh, kw, channels)`, already in the compute dtype.
      strides: `(st, sh, sw)`.
      padding: `((pt, pt), (ph, ph), (pw, pw))`, symmetric as in the original.
      impl: "taps" (sum of shifted slices), "lax" (grouped conv) or "auto" (per backend,
        `resolve_impl`).
    """
    impl = resolve_impl(impl)
    strides = tuple(strides)
    padding = tuple(tuple(p) for p in padding)
    if impl == "taps":
        return _depthwise_taps(x, kernel, strides, padding)
    return _depthwise_lax(x, kernel, strides, padding)
