"""The training loss of the original: the mouse-weighted Poisson loss (spec section 4).

    l(pred, y) = pred - y * log(pred + 1e-8)              (Poisson NLL, log_input=False, full=False)
    w = mice_weights / sum(mice_weights)                  (over the whole batch and all mice)
    loss = sum_m sum_{b: w[b, m] != 0} w[b, m] * sum_{t, n} l(pred_m[b, t, n], y_m[b, t, n])

A SUM over neurons and time, a weighted mean over samples, mice weighted by their share of the
batch (hazard 9: a mean would shrink the gradients towards Adam's eps and stop weighting mice by
their neuron counts). Always computed in float32, whatever the compute dtype: eps = 1e-8
underflows in half precision.
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
    """The original's loss over all readouts.

    Args:
      preds: per mouse m, predictions (batch, time, neurons_m).
      targets: per mouse m, targets (batch, time, neurons_m); rows with weight 0 are ignored
        (they may hold anything finite).
      mice_weights: (batch, num_mice); 0 marks a missing (sample, mouse) pair.

    Returns:
      The scalar float32 loss.
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
    """The loss of a "true batch" without distillation, from the loader's compact targets.

    Each sample is labeled for its own mouse only (one-hot mice weights), so only its own
    readout's output counts. Equal to `mice_poisson_loss` with one-hot weights.

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
