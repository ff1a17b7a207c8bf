"""Optimiser, learning-rate schedule and EMA of the original recipe (docs/original.md#training):
per-iteration warm-up from 0 then cosine to min_lr, AdamW decaying every parameter, and an EMA
(0.999 from step 0) over every state entry, BatchNorm statistics included.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def scaled_lr(lr_per_4_samples: float, batch_size: int) -> float:
    """The original's linear scaling rule: lr * batch_size / 4 (3e-4 at batch 32 -> 2.4e-3)."""
    return lr_per_4_samples * batch_size / 4


def lr_schedule(base_lr: float, min_lr: float, warmup_steps: int,
                cosine_steps: int) -> optax.Schedule:
    """Warm-up from 0, then cosine to min_lr, both per iteration (jit-able)."""
    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = base_lr * step / max(warmup_steps, 1)
        j = jnp.clip(step - warmup_steps, 0, cosine_steps)
        cosine = min_lr + (base_lr - min_lr) * (1 + jnp.cos(jnp.pi * j / max(cosine_steps, 1))) / 2
        return jnp.where(step < warmup_steps, warm, cosine)
    return schedule


def adamw(schedule: optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
    """torch.optim.AdamW with its defaults and no decay mask; like torch, the decay is scaled by
    the current learning rate (none at step 0)."""
    return optax.adamw(learning_rate=schedule, b1=0.9, b2=0.999, eps=1e-8,
                       weight_decay=weight_decay)


def ema_update(ema: Any, state: Any, decay: float) -> Any:
    """ema <- decay * ema + (1 - decay) * state on float leaves; other leaves take the state's."""
    def update(e, s):
        if not jnp.issubdtype(jnp.asarray(e).dtype, jnp.floating):
            return s
        return decay * e + (1.0 - decay) * s
    return jax.tree.map(update, ema, state)
