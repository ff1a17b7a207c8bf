"""The one eval-mode forward pass over windows, for validation, prediction, reports and the
in-silico experiments. Windows come compact (frames (B, 16, 36, 64), traces (B, 16, 4)); the
model input is built here, inside the jitted program."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from dwise_jax.data import windows


def apply(graphdef: Any, states: tuple, frames, traces, readout: int | jax.Array) -> jax.Array:
    """A model's predictions of windows, float32.

    Args:
      graphdef, states: the eval-mode model split by `nnx.split`, e.g. `(state,)` or
        `(params, batch_stats, rest)`.
      readout: an int: every window by that readout, (B, 16, N); or a (B,) int array: each
        window by its own mouse's readout, (B, 16, max N), zero past the mouse's neurons.
    """
    model = nnx.merge(graphdef, *states)
    features = model.features(windows.expand_inputs(frames, traces))
    if isinstance(readout, int):
        return model.readouts[readout](features)
    return model.own_readouts(features, readout)


# Jitted for prediction (`readout` a (B,) array); validation and inference jit `apply` inside
# their own programs.
jitted = jax.jit(apply, static_argnums=0)
