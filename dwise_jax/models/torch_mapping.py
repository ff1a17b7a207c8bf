"""The original PyTorch state dict <-> the NNX state of `DwiseNeuro`.

Names and layouts of both sides: docs/original.md#original-checkpoints. `num_batches_tracked`
(no counter is kept here) and `inv_freq` (recomputed; see `inv_freq_deviation`) are accepted
and ignored. `state_to_torch` maps states and gradients back (the parity tests use it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# NNX attribute of an inverted-residual block -> (PyTorch submodule, layout of its `.0` conv).
_BLOCK_CONVS = {
    "expand": ("conv_pw", "pointwise3d"),
    "spatial": ("spat_covn_dw", "spatial_dw"),
    "temporal": ("temp_covn_dw", "temporal_dw"),
    "project": ("conv_pwl", "pointwise3d"),
}
_IGNORED = re.compile(r"(.*\.num_batches_tracked|core\.blocks\.\d*[02468]\.inv_freq)$")


def _grouped_to_torch(k: np.ndarray) -> np.ndarray:
    g, i, o = k.shape
    return k.transpose(0, 2, 1).reshape(g * o, i, 1)


def _grouped_from_torch(w: np.ndarray, shape) -> np.ndarray:
    g, i, o = shape
    return w.reshape(g, o, i).transpose(0, 2, 1)


# layout -> (NNX array from PyTorch array and NNX shape, PyTorch array from NNX, PyTorch shape)
_LAYOUTS: dict[str, tuple[Callable, Callable, Callable]] = {
    "vector": (lambda w, s: w, lambda k: k, lambda s: tuple(s)),
    "pointwise3d": (
        lambda w, s: w.reshape(w.shape[:2]).T,
        lambda k: k.T.reshape(*k.T.shape, 1, 1, 1),
        lambda s: (s[1], s[0], 1, 1, 1),
    ),
    "spatial_dw": (
        lambda w, s: w[:, 0, 0].transpose(1, 2, 0),
        lambda k: k.transpose(2, 0, 1)[:, None, None],
        lambda s: (s[2], 1, 1, s[0], s[1]),
    ),
    "temporal_dw": (
        lambda w, s: w[:, 0, :, 0, 0].T,
        lambda k: k.T[:, None, :, None, None],
        lambda s: (s[1], 1, s[0], 1, 1),
    ),
    "grouped1d": (
        _grouped_from_torch,
        _grouped_to_torch,
        lambda s: (s[0] * s[2], s[1], 1),
    ),
}


class StateDictMismatch(KeyError):
    """The PyTorch state dict does not fit the model: lists every missing, unexpected and
    mis-shaped key."""

    def __str__(self) -> str:
        return str(self.args[0])


def torch_name(path: tuple) -> tuple[str, str] | None:
    """(PyTorch state-dict name, layout) of one NNX state path; None for RNG state."""
    p = tuple(str(x) for x in path)
    if "rngs" in p:
        return None
    if p[0] == "core" and p[1] == "stem_kernel":
        return "core.stem.0.weight", "pointwise3d"
    if p[0] == "core" and p[1] == "stem_bn":
        return f"core.stem.1.bn.{_BN[p[2]]}", "vector"
    if p[0] == "core" and p[1] == "blocks":
        prefix = f"core.blocks.{2 * int(p[2]) + 1}."
        attr = p[3]
        if attr == "se":
            kind, what = p[4].split("_")  # reduce_kernel, expand_bias, ...
            torch_attr = "weight" if what == "kernel" else "bias"
            layout = "pointwise3d" if what == "kernel" else "vector"
            return f"{prefix}se.conv_{kind}.{torch_attr}", layout
        if attr == "shortcut_bn":
            return f"{prefix}bn_sc.bn.{_BN[p[4]]}", "vector"
        stem, suffix = attr.rsplit("_", 1)
        module, layout = _BLOCK_CONVS[stem]
        if suffix == "kernel":
            return f"{prefix}{module}.0.weight", layout
        return f"{prefix}{module}.1.bn.{_BN[p[4]]}", "vector"
    if p[0] == "cortex":
        prefix = f"cortex.layers.{int(p[2])}."
        if p[3] == "kernel":
            return f"{prefix}conv.weight", "grouped1d"
        bn = "bn.bn" if p[3] == "bn" else "bn_sc.bn"
        return f"{prefix}{bn}.{_BN[p[4]]}", "vector"
    if p[0] == "readouts":
        prefix = f"readouts.{int(p[1])}.layer.1."
        if p[2] == "kernel":
            return f"{prefix}weight", "grouped1d"
        return f"{prefix}bias", "vector"
    raise KeyError(f"no PyTorch name for NNX path {path}")


def state_from_torch(state_dict: Mapping[str, np.ndarray], target: nnx.State) -> nnx.State:
    """Map a PyTorch state dict (name -> array) onto a new NNX state (float32 arrays).

    `target` (`nnx.state(model)` or its `nnx.eval_shape` version) gives the structure, shapes
    and variable types; RNG variables are copied from it. Raises StateDictMismatch.
    """
    used, missing, misshaped, flat = set(), [], [], []
    for path, var in nnx.to_flat_state(target):
        named = torch_name(path)
        if named is None:
            flat.append((path, var))
            continue
        name, layout = named
        to_nnx, _, torch_shape = _LAYOUTS[layout]
        if name not in state_dict:
            missing.append(name)
            continue
        used.add(name)
        w = np.asarray(state_dict[name], dtype=np.float32)
        if w.shape != torch_shape(var.shape):
            misshaped.append(f"{name}: got {w.shape}, expected {torch_shape(var.shape)}")
            continue
        flat.append((path, var.replace(jnp.asarray(to_nnx(w, var.shape)))))
    unexpected = sorted(k for k in state_dict if k not in used and not _IGNORED.match(k))
    if missing or unexpected or misshaped:
        raise StateDictMismatch(
            "PyTorch state dict does not match the model:\n"
            f"  missing ({len(missing)}): {missing}\n"
            f"  unexpected ({len(unexpected)}): {unexpected}\n"
            f"  mis-shaped ({len(misshaped)}): {misshaped}"
        )
    return nnx.from_flat_state(flat)


def state_to_torch(state: nnx.State) -> dict[str, np.ndarray]:
    """NNX state (parameters, BatchNorm statistics or gradients) -> PyTorch names and layouts."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        named = torch_name(path)
        if named is None:
            continue
        name, layout = named
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        out[name] = _LAYOUTS[layout][1](np.asarray(value, dtype=np.float32))
    return out


def inv_freq_deviation(state_dict: Mapping[str, np.ndarray]) -> float:
    """Largest relative difference between the state dict's positional-encoding `inv_freq`
    buffers and the recomputed frequencies (0.0 if there are none). EMA-averaged checkpoints
    may differ by ~1e-5, since the EMA averaged them too
    (docs/original.md#original-checkpoints); freshly built models by float rounding only."""
    worst = 0.0
    for name, value in state_dict.items():
        if name.endswith(".inv_freq"):
            value = np.asarray(value, np.float64)
            ch = 2 * value.shape[0]
            ref = 1.0 / 10000 ** (np.arange(0, ch, 2, dtype=np.float64) / ch)
            worst = max(worst, float(np.max(np.abs(value - ref) / ref)))
    return worst
