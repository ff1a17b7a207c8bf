"""The training loss of the original: the mouse-weighted Poisson loss
(docs/original.md#training).

    l(pred, y) = pred - y * log(pred + 1e-8)              (Poisson NLL, log_input=False, full=False)
    w = mice_weights / sum(mice_weights)                  (over the whole batch and all mice)
    loss = sum_m sum_{b: w[b, m] != 0} w[b, m] * sum_{t, n} l(pred_m[b, t, n], y_m[b, t, n])

A SUM over neurons and time, not a mean (docs/original.md#loss-is-a-sum), and always float32:
1e-8 underflows in half precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

POISSON_EPS = 1e-8


def poisson_nll(pred: jax.Array, target: jax.Array, eps: float = POISSON_EPS) -> jax.Array:
    """Elementwise Poisson negative log-likelihood without the constant term, float32."""
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    return pred - target * jnp.log(pred + eps)


def mice_poisson_loss(preds: Sequence[jax.Array], targets: Sequence[jax.Array],
                      mice_weights: jax.Array) -> jax.Array:
    """The original's loss over all readouts, a float32 scalar.

    `preds`, `targets`: per mouse m, (batch, time, neurons_m); `mice_weights` (batch, num_mice),
    0 for a missing (sample, mouse) pair, whose targets may hold anything finite.
    """
    weights = mice_weights.astype(jnp.float32)
    weights = weights / jnp.sum(weights)
    total = jnp.float32(0.0)
    for m, (pred, target) in enumerate(zip(preds, targets, strict=True)):
        per_sample = jnp.sum(poisson_nll(pred, target), axis=(1, 2))
        w = weights[:, m]
        total += jnp.sum(jnp.where(w != 0, w * per_sample, 0.0))
    return total


def own_mouse_loss(preds: Sequence[jax.Array], targets: jax.Array, mouse: jax.Array,
                   sample_weight: jax.Array | None = None) -> jax.Array:
    """`mice_poisson_loss` with one-hot mice weights, from the loader's compact targets.

    Args:
      preds: per mouse m, predictions (batch, time, neurons_m).
      targets: (batch, time, max_neurons), each sample's own targets, zero-padded.
      mouse: (batch,) int, each sample's mouse (readout) index.
      sample_weight: optional (batch,) weights (e.g. 0 for padding samples); default 1.
    """
    num_mice = len(preds)
    weights = jax.nn.one_hot(mouse, num_mice, dtype=jnp.float32)
    if sample_weight is not None:
        weights = weights * sample_weight[:, None].astype(jnp.float32)
    per_mouse_targets = [targets[..., : pred.shape[-1]] for pred in preds]
    return mice_poisson_loss(preds, per_mouse_targets, weights)


def own_readout_loss(preds: jax.Array, targets: jax.Array, neuron_mask: jax.Array,
                     sample_weight: jax.Array | None = None) -> jax.Array:
    """`own_mouse_loss` from each sample's own readout only (`DwiseNeuro.own_readouts`).

    `preds` (batch, time, max_neurons) may hold anything past a sample's neurons; `neuron_mask`
    (batch, max_neurons) is True for them; `targets`, `sample_weight` as `own_mouse_loss`.
    """
    batch = preds.shape[0]
    weights = (jnp.ones((batch,), jnp.float32) if sample_weight is None
               else sample_weight.astype(jnp.float32))
    weights = weights / jnp.sum(weights)
    nll = jnp.where(neuron_mask[:, None, :], poisson_nll(preds, targets), 0.0)
    return jnp.sum(jnp.where(weights != 0, weights * jnp.sum(nll, axis=(1, 2)), 0.0))


def distillation_weights(mice_weights: jax.Array, ratio: float) -> jax.Array:
    """The original's distillation weights: every missing pair gets w_d, labels keep theirs.

        w_d = ratio / (1 - ratio) * sum(mice_weights) / #(pairs with weight 0)

    so that the labels hold 1 - ratio of the normalised weight and the teacher's predictions
    `ratio` (docs/original.md#distillation). `mice_weights` (batch, num_mice): before it.
    """
    weights = mice_weights.astype(jnp.float32)
    missing = weights == 0
    count = jnp.maximum(jnp.sum(missing), 1)
    w_d = ratio / (1.0 - ratio) * jnp.sum(weights) / count
    return jnp.where(missing, w_d, weights)


def distillation_loss(preds: Sequence[jax.Array], targets: jax.Array, mouse: jax.Array,
                      teacher_preds: Sequence[jax.Array], ratio: float) -> jax.Array:
    """The loss of a distillation step, over all readouts.

    Each sample keeps its own mouse's real targets with weight 1; every other (sample, mouse)
    pair takes the teacher's prediction (`teacher_preds`, shaped as `preds`) as its target
    with weight w_d (`distillation_weights`). `targets` and `mouse` as `own_mouse_loss`.
    """
    num_mice = len(preds)
    weights = distillation_weights(jax.nn.one_hot(mouse, num_mice, dtype=jnp.float32), ratio)
    own = mouse[:, None, None]
    per_mouse = [jnp.where(own == m, targets[..., : pred.shape[-1]], teacher.astype(jnp.float32))
                 for m, (pred, teacher) in enumerate(zip(preds, teacher_preds, strict=True))]
    return mice_poisson_loss(preds, per_mouse, weights)
