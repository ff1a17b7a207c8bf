"""The jit-compiled train and eval steps, and the train state they carry.

The train state is a plain pytree of nested dicts of arrays (what Orbax saves as it is):

    step         ()  int32    optimiser steps taken
    params       the model's nnx.Param values (float32)
    batch_stats  the BatchNorm running statistics (float32)
    opt_state    the AdamW state (optax)
    ema          {"params": ..., "batch_stats": ...}: the EMA of both, decay 0.999 after
                 every step (hazard 14); validation, checkpoints and prediction use it.

The model's structure (its nnx graph) is kept apart, once for training (dropout, drop path and
batch statistics on) and once for evaluation (running statistics, no dropout). Dropout keys
derive from (seed, step) in every step, so a resumed run draws the same masks.

Data parallelism: the step is one `jax.jit` over the global batch. With the batch sharded on the
mesh's `data` axis and the state replicated (dwise_jax.sharding), XLA inserts the gradient
all-reduce and the cross-device BatchNorm statistics, so N devices compute what one would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dwise_jax import losses, optim
from dwise_jax.data.pipeline import device_inputs

Batch = Mapping[str, jax.Array]
TrainState = dict[str, Any]


class Trainer:
    """Builds the initial state and the jitted steps of one model.

    Args:
      model: a freshly initialised DwiseNeuro (built with `nnx.Rngs(params=..., dropout=...)`).
      tx: the optax optimiser (dwise_jax.optim.adamw with the schedule).
      ema_decay: EMA decay per step.
      iter_size: gradient accumulation; the batch is split into this many chunks (the original's
        iter_size), the gradients averaged, BatchNorm statistics updated chunk after chunk.
      seed: dropout keys derive from (seed, step, chunk).
    """

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, *,
                 ema_decay: float, iter_size: int = 1, seed: int = 0):
        self.tx = tx
        self.ema_decay = ema_decay
        self.iter_size = iter_size
        self.seed = seed
        self.num_readouts = len(model.readouts)
        model.train()
        self.train_def, params, batch_stats, rng_state = nnx.split(
            model, nnx.Param, nnx.BatchStat, ...)
        # Plain values, merged into fresh variables at every trace (scan included).
        self.rng_state = nnx.to_pure_dict(rng_state)
        model.eval()
        self.eval_def = nnx.split(model, nnx.Param, nnx.BatchStat, ...)[0]
        model.train()
        self._initial = (nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats))

    def init_state(self) -> TrainState:
        """Step 0: the model's initial weights, fresh AdamW moments, EMA = a copy of the model."""
        params, batch_stats = self._initial
        copy = lambda tree: jax.tree.map(jnp.array, tree)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": copy(params),
            "batch_stats": copy(batch_stats),
            "opt_state": self.tx.init(params),
            "ema": {"params": copy(params), "batch_stats": copy(batch_stats)},
        }

    # ------------------------------------------------------------------------------ train

    def _loss(self, params, batch_stats, x, targets, mouse, key):
        model = nnx.merge(self.train_def, params, batch_stats, self.rng_state)
        nnx.reseed(model, dropout=key)
        preds = model(x)
        loss = losses.own_mouse_loss(preds, targets, mouse)
        return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    def train_step(self, state: TrainState,
                   batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimiser step on a training batch (format: dwise_jax.data.pipeline)."""
        x = device_inputs(batch)
        targets, mouse = batch["targets"], batch["mouse"]
        key = jax.random.fold_in(jax.random.key(self.seed), state["step"])
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        if self.iter_size == 1:
            (loss, batch_stats), grads = grad_fn(state["params"], state["batch_stats"], x,
                                                 targets, mouse, key)
        else:
            chunks = lambda a: a.reshape(self.iter_size, -1, *a.shape[1:])

            def accumulate(carry, chunk):
                batch_stats, grad_sum, loss_sum, i = carry
                cx, ct, cm = chunk
                (loss, batch_stats), grads = grad_fn(
                    state["params"], batch_stats, cx, ct, cm, jax.random.fold_in(key, i))
                grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
                return (batch_stats, grad_sum, loss_sum + loss, i + 1), None

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            carry = (state["batch_stats"], zeros, jnp.float32(0.0), jnp.int32(0))
            (batch_stats, grads, loss, _), _ = jax.lax.scan(
                accumulate, carry, (chunks(x), chunks(targets), chunks(mouse)))
            grads = jax.tree.map(lambda g: g / self.iter_size, grads)
            loss = loss / self.iter_size
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = optim.ema_update(state["ema"], {"params": params, "batch_stats": batch_stats},
                               self.ema_decay)
        new_state = {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats,
                     "opt_state": opt_state, "ema": ema}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    # ------------------------------------------------------------------------------- eval

    def eval_step(self, weights: Mapping[str, Any], batch: Batch) -> dict[str, jax.Array]:
        """Eval-mode predictions of each sample's own readout, float32.

        Args:
          weights: {"params", "batch_stats"} (the EMA, or the raw model's).
          batch: a validation batch (frames, traces, mouse, targets, neuron_mask, valid).

        Returns:
          preds (B, 16, N) zero past the mouse's neurons, and the per-sample Poisson loss (B,)
          summed over neurons and time.
        """
        model = nnx.merge(self.eval_def, weights["params"], weights["batch_stats"],
                          self.rng_state)
        x = device_inputs(batch)
        outputs = model(x)
        width = batch["targets"].shape[-1]
        stacked = jnp.stack([jnp.pad(o, ((0, 0), (0, 0), (0, width - o.shape[-1])))
                             for o in outputs])  # (readouts, B, 16, N)
        preds = jnp.take_along_axis(stacked, batch["mouse"][None, :, None, None], axis=0)[0]
        mask = batch["neuron_mask"][:, None, :]
        preds = jnp.where(mask, preds, 0.0)
        nll = jnp.where(mask, losses.poisson_nll(preds, batch["targets"]), 0.0)
        return {"preds": preds, "loss": jnp.sum(nll, axis=(1, 2))}


def jit_steps(trainer: Trainer, state_sharding: Any = None,
              batch_sharding: Any = None) -> tuple[Callable, Callable]:
    """The jitted train step (state donated) and eval step, with optional shardings."""
    kwargs = {}
    if state_sharding is not None:
        kwargs = {"in_shardings": (state_sharding, batch_sharding),
                  "out_shardings": (state_sharding, None)}
    train = jax.jit(trainer.train_step, donate_argnums=0, **kwargs)
    evaluate = jax.jit(trainer.eval_step)
    return train, evaluate
