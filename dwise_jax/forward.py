"""The one eval-mode forward over windows (validation, prediction, reports, in-silico); compact
windows (frames (B, 16, 36, 64), traces (B, 16, 4)) become model inputs inside the jit."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from dwise_jax.data import windows


def apply(graphdef: Any, states: tuple, frames, traces, readout: int | jax.Array) -> jax.Array:
    """Float32 predictions of windows by the model `nnx.merge(graphdef, *states)`: an int
    `readout` gives (B, 16, N) of that readout; a (B,) array each window's own mouse's readout,
    (B, 16, max N), zero past the mouse's neurons."""
    model = nnx.merge(graphdef, *states)
    features = model.features(windows.expand_inputs(frames, traces, rows=model.canvas_rows))
    if isinstance(readout, int):
        return model.readouts[readout](features)
    return model.own_readouts(features, readout)


# Jitted for prediction; validation and inference call `apply` inside their own jitted programs.
jitted = jax.jit(apply, static_argnums=0)
