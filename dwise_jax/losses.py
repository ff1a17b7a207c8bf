"""The original's mouse-weighted Poisson loss (docs/original.md#training): a SUM over neurons and
time (#loss-is-a-sum), always float32 (1e-8 underflows in half precision). Predictions and targets
are (batch, time, neurons).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

POISSON_EPS = 1e-8


def poisson_nll(pred: jax.Array, target: jax.Array, eps: float = POISSON_EPS) -> jax.Array:
    """Elementwise Poisson negative log-likelihood without the constant term, float32."""
    pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
    return pred - target * jnp.log(pred + eps)


def mice_poisson_loss(preds: Sequence[jax.Array], targets: Sequence[jax.Array],
                      mice_weights: jax.Array) -> jax.Array:
    """The original's loss over all readouts m; `mice_weights` (batch, mice) is 0 for a missing
    (sample, mouse) pair, whose targets may hold anything finite."""
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
    """`mice_poisson_loss` with one-hot weights on `mouse` (batch,) from the loader's compact
    `targets` (batch, time, max_neurons), times an optional (batch,) `sample_weight`."""
    weights = jax.nn.one_hot(mouse, len(preds), dtype=jnp.float32)
    if sample_weight is not None:
        weights = weights * sample_weight[:, None].astype(jnp.float32)
    return mice_poisson_loss(preds, [targets[..., : p.shape[-1]] for p in preds], weights)


def own_readout_loss(preds: jax.Array, targets: jax.Array, neuron_mask: jax.Array) -> jax.Array:
    """`own_mouse_loss` from each sample's own readout only (`DwiseNeuro.own_readouts`): `preds`
    (batch, time, max_neurons) count where `neuron_mask` (batch, max_neurons) is True."""
    weights = jnp.ones((preds.shape[0],), jnp.float32)
    weights = weights / jnp.sum(weights)
    nll = jnp.where(neuron_mask[:, None, :], poisson_nll(preds, targets), 0.0)
    return jnp.sum(jnp.where(weights != 0, weights * jnp.sum(nll, axis=(1, 2)), 0.0))


def distillation_weights(mice_weights: jax.Array, ratio: float) -> jax.Array:
    """Every (sample, mouse) pair of weight 0 gets w_d = ratio / (1 - ratio) * sum(weights) /
    #(such pairs), so the teacher holds `ratio` of the loss (docs/original.md#distillation)."""
    weights = mice_weights.astype(jnp.float32)
    missing = weights == 0
    count = jnp.maximum(jnp.sum(missing), 1)
    w_d = ratio / (1.0 - ratio) * jnp.sum(weights) / count
    return jnp.where(missing, w_d, weights)


def distillation_loss(preds: Sequence[jax.Array], targets: jax.Array, mouse: jax.Array,
                      teacher_preds: Sequence[jax.Array], ratio: float) -> jax.Array:
    """A distillation step's loss: each sample's own mouse with its real targets (weight 1),
    every other readout with the teacher's predictions (shaped as `preds`) at weight w_d."""
    weights = distillation_weights(jax.nn.one_hot(mouse, len(preds), dtype=jnp.float32), ratio)
    own = mouse[:, None, None]
    per_mouse = [jnp.where(own == m, targets[..., : pred.shape[-1]], teacher.astype(jnp.float32))
                 for m, (pred, teacher) in enumerate(zip(preds, teacher_preds, strict=True))]
    return mice_poisson_loss(preds, per_mouse, weights)
