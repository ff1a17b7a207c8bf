"""The jit-compiled train and eval steps, and the train state they carry: a pytree of dicts
{step, params, batch_stats, opt_state, ema} that Orbax saves as it is
(docs/design.md#the-train-step)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

from dwise_jax import forward, losses, optim
from dwise_jax.data.pipeline import device_inputs

Batch = Mapping[str, jax.Array]
TrainState = dict[str, Any]


class Trainer:
    """The initial state and the steps of a fresh DwiseNeuro (`nnx.Rngs(params=..., dropout=...)`)
    with the optax `tx`. `iter_size`: the original's gradient accumulation (chunks, gradients
    averaged, BatchNorm statistics updated chunk after chunk); dropout keys derive from (seed,
    step, chunk); `readouts` without a teacher: "needed" (own readout) or "all" (the others
    masked out), the same loss and gradients; `teacher` for distillation, its weights passed to
    `train_step` (`self.teacher_weights`), `distill_ratio` its share of the loss weight."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, *,
                 ema_decay: float, iter_size: int = 1, seed: int = 0, readouts: str = "needed",
                 teacher: nnx.Module | None = None, distill_ratio: float = 0.36):
        if readouts not in ("needed", "all"):
            raise ValueError(f"readouts must be 'needed' or 'all', got {readouts!r}")
        self.tx = tx
        self.ema_decay = ema_decay
        self.iter_size = iter_size
        self.seed = seed
        self.readouts = readouts
        self.distill_ratio = distill_ratio
        model.train()
        self.train_def, params, batch_stats, rng_state = nnx.split(
            model, nnx.Param, nnx.BatchStat, ...)
        # Plain values, merged into fresh variables at every trace (scan included).
        self.rng_state = nnx.to_pure_dict(rng_state)
        model.eval()
        self.eval_def = nnx.split(model, nnx.Param, nnx.BatchStat, ...)[0]
        model.train()
        self._initial = (nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats))
        self.canvas_rows = model.canvas_rows  # the input rows built: the model's, or the teacher's
        self.teacher_def = self.teacher_weights = None
        if teacher is not None:
            if list(teacher.readout_outputs) != list(model.readout_outputs):
                raise ValueError(f"the teacher's readouts {list(teacher.readout_outputs)} differ "
                                 f"from the student's {list(model.readout_outputs)}")
            teacher.eval()
            self.canvas_rows = max(self.canvas_rows, teacher.canvas_rows)
            self.teacher_def, t_params, t_stats, t_rest = nnx.split(
                teacher, nnx.Param, nnx.BatchStat, ...)
            self.teacher_rest = nnx.to_pure_dict(t_rest)
            self.teacher_weights = {"params": nnx.to_pure_dict(t_params),
                                    "batch_stats": nnx.to_pure_dict(t_stats)}

    @property
    def distills(self) -> bool:
        """Whether the train step takes a teacher's weights (distillation)."""
        return self.teacher_def is not None

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

    def _loss(self, params, batch_stats, data, key, teacher_preds):
        model = nnx.merge(self.train_def, params, batch_stats, self.rng_state)
        nnx.reseed(model, dropout=key)
        targets, mouse = data["targets"], data["mouse"]
        if teacher_preds is not None:
            loss = losses.distillation_loss(model(data["x"]), targets, mouse, teacher_preds,
                                            self.distill_ratio)
        elif self.readouts == "all":
            loss = losses.own_mouse_loss(model(data["x"]), targets, mouse)
        else:
            preds = model.own_readouts(model.features(data["x"]), mouse)
            loss = losses.own_readout_loss(preds, targets, data["neuron_mask"])
        return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    def _teacher_predict(self, teacher_weights, x) -> list[jax.Array]:
        """All readouts of the frozen teacher (eval mode), float32, without gradient."""
        teacher = nnx.merge(self.teacher_def, teacher_weights["params"],
                            teacher_weights["batch_stats"], self.teacher_rest)
        return [lax.stop_gradient(p) for p in teacher(x)]

    def train_step(self, state: TrainState, batch: Batch,
                   teacher_weights: Mapping[str, Any] | None = None,
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimiser step on a training batch (dwise_jax.data.pipeline); `teacher_weights`
        (`self.teacher_weights`) exactly when distilling."""
        if (teacher_weights is None) == self.distills:
            raise ValueError("teacher_weights must be given exactly when the Trainer distills")
        data = {"x": device_inputs(batch, self.canvas_rows), "targets": batch["targets"],
                "mouse": batch["mouse"], "neuron_mask": batch["neuron_mask"]}
        key = jax.random.fold_in(jax.random.key(self.seed), state["step"])
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        def loss_and_grads(batch_stats, chunk, key):
            teacher_preds = (None if teacher_weights is None
                             else self._teacher_predict(teacher_weights, chunk["x"]))
            return grad_fn(state["params"], batch_stats, chunk, key, teacher_preds)

        if self.iter_size == 1:
            (loss, batch_stats), grads = loss_and_grads(state["batch_stats"], data, key)
        else:
            chunks = lambda a: a.reshape(self.iter_size, -1, *a.shape[1:])

            def accumulate(carry, chunk):
                batch_stats, grad_sum, loss_sum, i = carry
                (loss, batch_stats), grads = loss_and_grads(batch_stats, chunk,
                                                            jax.random.fold_in(key, i))
                grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
                return (batch_stats, grad_sum, loss_sum + loss, i + 1), None

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            carry = (state["batch_stats"], zeros, jnp.float32(0.0), jnp.int32(0))
            (batch_stats, grads, loss, _), _ = jax.lax.scan(
                accumulate, carry, jax.tree.map(chunks, data))
            grads = jax.tree.map(lambda g: g / self.iter_size, grads)
            loss = loss / self.iter_size
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = optim.ema_update(state["ema"], {"params": params, "batch_stats": batch_stats},
                               self.ema_decay)
        new_state = {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats,
                     "opt_state": opt_state, "ema": ema}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def eval_step(self, weights: Mapping[str, Any], batch: Batch) -> dict[str, jax.Array]:
        """Eval-mode predictions of each sample's own readout with `weights` ({"params",
        "batch_stats"}: the EMA's or the raw model's): "preds" (B, 16, N) float32, zero past the
        mouse's neurons, and "loss" (B,): the Poisson loss summed over neurons and time."""
        preds = forward.apply(self.eval_def, (weights["params"], weights["batch_stats"],
                                              self.rng_state),
                              batch["frames"], batch["traces"], batch["mouse"])
        mask = batch["neuron_mask"][:, None, :]
        preds = jnp.where(mask, preds, 0.0)
        nll = jnp.where(mask, losses.poisson_nll(preds, batch["targets"]), 0.0)
        return {"preds": preds, "loss": jnp.sum(nll, axis=(1, 2))}


def jit_steps(trainer: Trainer, state_sharding: Any = None,
              batch_sharding: Any = None) -> tuple[Callable, Callable]:
    """The jitted train step (state donated) and eval step, with optional shardings. A
    distilling train step takes the teacher's weights third, replicated like the state."""
    kwargs = {}
    if state_sharding is not None:
        shardings = (state_sharding, batch_sharding)
        if trainer.distills:
            shardings += (state_sharding,)
        kwargs = {"in_shardings": shardings, "out_shardings": (state_sharding, None)}
    train = jax.jit(trainer.train_step, donate_argnums=0, **kwargs)
    # Outputs sharded like the batch: each process reads back only its own rows.
    evaluate = jax.jit(trainer.eval_step, out_shardings=batch_sharding)
    return train, evaluate
