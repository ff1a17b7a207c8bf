"""Each sample's own readout only: samples sorted by mouse, readout m multiplies only mouse m's
rows, padded to a static bucket size chosen by `lax.switch`, with a custom VJP. Why this way
(not `ragged_dot`, not plain autodiff): docs/design.md#only-the-readouts-a-batch-needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from dwise_jax.models import layers


def bucket_sizes(batch: int) -> tuple[int, ...]:
    """Static row counts a mouse's samples are padded to: 1, 2, 3, 4, 6, 8, 12, ..., batch."""
    sizes, s = {batch}, 1
    while s < batch:
        sizes.update((s, s * 3 // 2) if s >= 2 else (s,))
        s *= 2
    return tuple(sorted(x for x in sizes if x <= batch))


def _groups(mouse: jax.Array, num_mice: int):
    """Sample order sorted by mouse (stable), and each mouse's sample count and first position."""
    order = jnp.argsort(mouse, stable=True).astype(jnp.int32)
    counts = jnp.zeros((num_mice,), jnp.int32).at[mouse].add(1)
    starts = jnp.cumsum(counts) - counts
    sizes = jnp.asarray(bucket_sizes(mouse.shape[0]), jnp.int32)
    # Branch 0 skips a mouse without samples; branch j >= 1 uses bucket j - 1.
    branch = jnp.where(counts == 0, 0, 1 + jnp.searchsorted(sizes, counts))
    return order, counts, starts, branch


def _rows(order, start, count, size: int):
    """Sample indexes of one mouse padded to `size` (clamped), and which of them are real."""
    i = jnp.arange(size, dtype=jnp.int32)
    rows = order[jnp.minimum(start + i, order.shape[0] - 1)]
    return rows, i < count


def _inputs(features, mask, rows, rate):
    x = features[rows]
    return x if mask is None else layers.apply_dropout_mask(x, mask[rows], rate)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def grouped_readouts(features: jax.Array, mouse: jax.Array, kernels: Sequence[jax.Array],
                     biases: Sequence[jax.Array], masks: Sequence[jax.Array] | None,
                     neurons: tuple[int, ...], rate: float) -> jax.Array:
    """Pre-activations of each sample's own readout, `(batch, time, max(neurons))`: for sample
    b the first neurons[mouse[b]] of its readout, then zeros. `features` `(batch, time, channels)`
    and per readout m `kernels` `(groups, channels / groups, padded_m / groups)` and `biases`
    `(padded_m,)`, in the compute dtype; `mouse` `(batch,)` int; `masks`: per readout its Dropout1d
    keep mask `(batch, 1, channels)` for the whole batch, drawn with `rate`, or None."""
    batch, time, _ = features.shape
    order, counts, starts, branch = _groups(mouse, len(neurons))
    out = jnp.zeros((batch, time, max(neurons)), features.dtype)

    def make(size, n):
        def run(out, features, kernel, bias, mask, order, start, count):
            rows, valid = _rows(order, start, count, size)
            y = layers.grouped_pointwise(_inputs(features, mask, rows, rate), kernel) + bias
            # Padding rows point past the batch and are dropped.
            return out.at[jnp.where(valid, rows, batch), :, :n].set(y[..., :n], mode="drop")
        return run

    skip = lambda out, *_: out
    for m, n in enumerate(neurons):
        mask = None if masks is None else masks[m]
        out = lax.switch(branch[m], [skip, *(make(s, n) for s in bucket_sizes(batch))], out,
                         features, kernels[m], biases[m], mask, order, starts[m], counts[m])
    return out


def _fwd(features, mouse, kernels, biases, masks, neurons, rate):
    out = grouped_readouts(features, mouse, kernels, biases, masks, neurons, rate)
    return out, (features, mouse, kernels, biases, masks)


def _bwd(neurons, rate, residuals, g):
    # Keeps only the inputs and redoes the gathers: autodiff of lax.switch would keep every
    # branch's residuals, as much memory as running all readouts.
    features, mouse, kernels, biases, masks = residuals
    batch, time, _ = features.shape
    order, counts, starts, branch = _groups(mouse, len(neurons))
    g = g.astype(features.dtype)

    def make(size, n):
        def run(dfeatures, features, kernel, bias, mask, order, start, count):
            rows, valid = _rows(order, start, count, size)
            groups = kernel.shape[0]
            gy = jnp.where(valid[:, None, None], g[rows][..., :n], jnp.zeros((), g.dtype))
            gy = jnp.pad(gy, ((0, 0), (0, 0), (0, bias.shape[0] - n)))
            gy = layers.split_groups(gy, groups)  # (groups, size * time, padded / groups)
            x = layers.split_groups(_inputs(features, mask, rows, rate), groups)
            dkernel = lax.dot_general(jnp.swapaxes(x, 1, 2), gy, (((2,), (1,)), ((0,), (0,))))
            dbias = jnp.sum(gy, axis=1).reshape(-1)
            dx = lax.dot_general(gy, kernel, (((2,), (2,)), ((0,), (0,))))
            dx = layers.merge_groups(dx, (size, time))
            if mask is not None:
                dx = layers.apply_dropout_mask(dx, mask[rows], rate)
            dfeatures = dfeatures.at[jnp.where(valid, rows, batch)].set(dx, mode="drop")
            return dfeatures, dkernel.astype(kernel.dtype), dbias.astype(bias.dtype)
        return run

    def skip(dfeatures, features, kernel, bias, *_):
        return dfeatures, jnp.zeros_like(kernel), jnp.zeros_like(bias)

    dfeatures, dkernels, dbiases = jnp.zeros_like(features), [], []
    for m, n in enumerate(neurons):
        mask = None if masks is None else masks[m]
        dfeatures, dk, db = lax.switch(
            branch[m], [skip, *(make(s, n) for s in bucket_sizes(batch))], dfeatures, features,
            kernels[m], biases[m], mask, order, starts[m], counts[m])
        dkernels.append(dk)
        dbiases.append(db)
    return (dfeatures, None, type(kernels)(dkernels), type(biases)(dbiases), None)


grouped_readouts.defvjp(_fwd, _bwd)
