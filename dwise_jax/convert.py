"""`python -m dwise_jax.convert ORIGINAL.pth OUT_DIR`: the original's weights as a dwise_jax fold.

Reads an original `model-<epoch>-<val_corr>.pth` with `torch.load(weights_only=True)` (torch
CPU: `pip install torch==2.13.0`), checks it, maps its EMA state dict onto the NNX model and writes
a fold that prediction uses like one trained here (docs/prediction.md#the-originals-weights).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from dwise_jax import checkpoint, cli
from dwise_jax import config as config_lib
from dwise_jax.data.sensorium import REAL_MICE
from dwise_jax.models.dwiseneuro import DwiseNeuro

# The input pipeline the weights were trained with must be the one we implement.
EXPECTED_FRAME_STACK = {"size": 16, "step": 2, "position": "last"}
EXPECTED_INPUTS_PROCESSOR = ("stack_inputs", {"size": (64, 64), "pad_fill_value": 0.0})
FILE_NAME = re.compile(r"model-(?P<epoch>\d+)-(?P<score>-?\d+(?:\.\d+)?)\.pth$")


class ConversionError(ValueError):
    """The .pth file is not one of the original's DwiseNeuro checkpoints, or does not fit."""


# The original's state-dict names and layouts <-> the NNX state of DwiseNeuro
# (docs/original.md#original-checkpoints).
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# NNX attribute of an inverted-residual block -> (PyTorch submodule, layout of its `.0` conv).
_BLOCK_CONVS = {"expand": ("conv_pw", "pointwise3d"), "spatial": ("spat_covn_dw", "spatial_dw"),
                "temporal": ("temp_covn_dw", "temporal_dw"), "project": ("conv_pwl", "pointwise3d")}
# `num_batches_tracked` (no counter is kept here) and `inv_freq` (recomputed by
# `dwiseneuro.pe_frequencies`) are accepted and ignored.
_IGNORED = re.compile(r"(.*\.num_batches_tracked|core\.blocks\.\d*[02468]\.inv_freq)$")
# layout -> (NNX array from PyTorch array and NNX shape, PyTorch array from NNX array)
LAYOUTS = {
    "vector": (lambda w, s: w, lambda k: k),
    "pointwise3d": (lambda w, s: w.reshape(w.shape[:2]).T,
                    lambda k: k.T.reshape(*k.T.shape, 1, 1, 1)),
    "spatial_dw": (lambda w, s: w[:, 0, 0].transpose(1, 2, 0),
                   lambda k: k.transpose(2, 0, 1)[:, None, None]),
    "temporal_dw": (lambda w, s: w[:, 0, :, 0, 0].T, lambda k: k.T[:, None, :, None, None]),
    "grouped1d": (lambda w, s: w.reshape(s[0], s[2], s[1]).transpose(0, 2, 1),
                  lambda k: k.transpose(0, 2, 1).reshape(k.shape[0] * k.shape[2], k.shape[1], 1)),
}


def torch_name(path: tuple) -> tuple[str, str] | None:
    """(PyTorch state-dict name, layout) of one NNX state path; None for RNG state."""
    p = tuple(str(x) for x in path)
    if "rngs" in p:
        return None
    if p[:2] == ("core", "stem_kernel"):
        return "core.stem.0.weight", "pointwise3d"
    if p[:2] == ("core", "stem_bn"):
        return f"core.stem.1.bn.{_BN[p[2]]}", "vector"
    if p[:2] == ("core", "blocks"):
        prefix, attr = f"core.blocks.{2 * int(p[2]) + 1}.", p[3]
        if attr == "se":
            kind, what = p[4].split("_")  # reduce_kernel, expand_bias, ...
            if what == "kernel":
                return f"{prefix}se.conv_{kind}.weight", "pointwise3d"
            return f"{prefix}se.conv_{kind}.bias", "vector"
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
        return f"{prefix}{'bn.bn' if p[3] == 'bn' else 'bn_sc.bn'}.{_BN[p[4]]}", "vector"
    if p[0] == "readouts":
        kind = ("weight", "grouped1d") if p[2] == "kernel" else ("bias", "vector")
        return f"readouts.{int(p[1])}.layer.1.{kind[0]}", kind[1]
    raise KeyError(f"no PyTorch name for NNX path {path}")


def state_from_torch(state_dict: Mapping[str, np.ndarray], target: nnx.State) -> nnx.State:
    """Map a PyTorch state dict (name -> array) onto a new NNX state of float32 arrays shaped
    like `target` (`nnx.state` of a model or of its `nnx.eval_shape`; RNG variables copied).
    Raises ConversionError listing every missing, unexpected and mis-shaped key."""
    used, missing, misshaped, flat = set(), [], [], []
    for path, var in nnx.to_flat_state(target):
        named = torch_name(path)
        if named is None:
            flat.append((path, var))
            continue
        name, layout = named
        to_nnx, to_torch = LAYOUTS[layout]
        if name not in state_dict:
            missing.append(name)
            continue
        used.add(name)
        w = np.asarray(state_dict[name], dtype=np.float32)
        expected = jax.eval_shape(to_torch, jax.ShapeDtypeStruct(var.shape, jnp.float32)).shape
        if w.shape != expected:
            misshaped.append(f"{name}: got {w.shape}, expected {expected}")
            continue
        flat.append((path, var.replace(jnp.asarray(to_nnx(w, var.shape)))))
    unexpected = sorted(k for k in state_dict if k not in used and not _IGNORED.match(k))
    if missing or unexpected or misshaped:
        raise ConversionError(
            "PyTorch state dict does not match the model:\n"
            f"  missing ({len(missing)}): {missing}\n"
            f"  unexpected ({len(unexpected)}): {unexpected}\n"
            f"  mis-shaped ({len(misshaped)}): {misshaped}")
    return nnx.from_flat_state(flat)


def load_original(path: str | Path) -> dict[str, Any]:
    """Reads an original checkpoint with torch's safe loader: {"params": its params dict,
    tensors left as they are, "state_dict": {name: ndarray}}."""
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "reading .pth files needs torch (CPU build): pip install torch==2.13.0") from None
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError)
        raise ConversionError(
            f"{path}: not a readable torch checkpoint ({_load_failure(e)})") from None
    if not isinstance(raw, dict) or set(raw) != {"model_name", "params", "nn_state_dict"}:
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ConversionError(
            f"{path}: expected a dict with model_name, params and nn_state_dict, got {keys}")
    if raw["model_name"] != "MouseModel":
        raise ConversionError(f"{path}: model_name is {raw['model_name']!r}, not 'MouseModel'")
    tensors = raw["nn_state_dict"]
    if bad := [name for name, t in tensors.items() if not isinstance(t, torch.Tensor)]:
        raise ConversionError(f"{path}: state-dict entry {bad[0]} is not a tensor")
    return {"params": raw["params"],
            "state_dict": {name: t.detach().cpu().numpy() for name, t in tensors.items()}}


def _load_failure(error: Exception) -> str:
    """torch.load's reason in one line: its unpickler's first sentence, without its advice."""
    text = str(error) or type(error).__name__
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    reason = match[1].split(". ")[0] if match else text
    return " ".join(reason.split())


def constructor_kwargs(params: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, Any]:
    """The DwiseNeuro constructor arguments of an original checkpoint, set on a locked
    `config.model` (an unknown argument or a value of another type is refused, a missing one
    keeps the config's), and the frame stack and input processor stored beside them, checked."""
    try:
        module_name, kwargs = params["nn_module"]
    except (KeyError, TypeError, ValueError):
        raise ConversionError(f"{path}: params['nn_module'] is not (name, kwargs)") from None
    if module_name != "dwiseneuro":
        raise ConversionError(f"{path}: nn_module is {module_name!r}, not 'dwiseneuro'")
    if not isinstance(kwargs, dict):
        raise ConversionError(f"{path}: nn_module arguments are not a dict")
    kwargs = dict(kwargs)
    readout_outputs = kwargs.pop("readout_outputs", None)
    if not (isinstance(readout_outputs, (list, tuple)) and readout_outputs
            and all(type(n) is int and n > 0 for n in readout_outputs)):
        raise ConversionError(
            f"{path}: nn_module readout_outputs must list each readout's neuron count, got "
            f"{readout_outputs!r}")
    config = config_lib.get_base_config()
    config.lock()
    if unknown := sorted(set(kwargs) - set(config.model)):
        raise ConversionError(f"{path}: unknown DwiseNeuro arguments {unknown}")
    for key, value in kwargs.items():
        try:
            setattr(config.model, key, value)
        except TypeError as e:
            raise ConversionError(f"{path}: nn_module argument {key}: {e}") from None
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        raise ConversionError(f"{path}: nn_module arguments: {e}") from None
    frame_stack = params.get("frame_stack")
    if frame_stack is not None and dict(frame_stack) != EXPECTED_FRAME_STACK:
        raise ConversionError(
            f"{path}: frame_stack {frame_stack} differs from {EXPECTED_FRAME_STACK}, "
            "the only input windowing dwise_jax implements")
    processor = params.get("inputs_processor")
    as_plain = lambda value: json.loads(json.dumps(value, default=repr))  # tuples as lists
    if processor is not None and as_plain(processor) != as_plain(EXPECTED_INPUTS_PROCESSOR):
        raise ConversionError(
            f"{path}: inputs_processor {processor} differs from {EXPECTED_INPUTS_PROCESSOR}")
    return config_lib.model_kwargs(config, readout_outputs)


def default_mice(readout_outputs: list[int]) -> list[str] | None:
    """The real ten mice in the original's order, if the neuron counts are theirs."""
    if [int(n) for n in readout_outputs] == [n for _, n in REAL_MICE]:
        return [name for name, _ in REAL_MICE]
    return None


def parse_file_name(path: str | Path) -> dict[str, Any]:
    """Epoch and validation correlation from `model-<epoch>-<val_corr>.pth`, if it has that form."""
    match = FILE_NAME.search(Path(path).name)
    if match is None:
        return {}
    return {"epoch": int(match["epoch"]), "val_corr": float(match["score"])}


def convert(pth_path: str | Path, workdir: str | Path, *, experiment: str, fold: int,
            mice: list[str] | None = None, overwrite: bool = False) -> Path:
    """Converts one original .pth into `<workdir>/<experiment>/fold_<fold>` (fold 0..6, the one
    validated on) and returns that. `mice`: folder names in readout order, required unless the
    readouts are the real ten mice's; `overwrite`: replace an existing checkpoint of the fold."""
    if not 0 <= fold < 7:
        raise ConversionError(f"fold must be in 0..6, got {fold}")
    original = load_original(pth_path)
    kwargs = constructor_kwargs(original["params"], pth_path)
    for name, array in original["state_dict"].items():
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise ConversionError(f"{pth_path}: state-dict entry {name} holds NaN or infinity")
    mice = mice or default_mice(kwargs["readout_outputs"])
    if mice is None:
        raise ConversionError(
            f"{pth_path}: readout neuron counts {kwargs['readout_outputs']} are not the real "
            "ten mice's; name the mice of the readouts with --mice")
    spec = checkpoint.ModelSpec(
        constructor=kwargs, mice=list(mice), source=f"converted from {Path(pth_path).name}",
        extra={"original": parse_file_name(pth_path), "original_path": str(Path(pth_path))})
    target_dir = checkpoint.fold_dir(workdir, experiment, fold)
    existing = checkpoint.latest_step(target_dir)
    if existing is not None and not overwrite:
        raise ConversionError(
            f"{target_dir}: already holds a checkpoint; pass --overwrite to replace it")
    abstract = nnx.eval_shape(lambda: DwiseNeuro(**kwargs, rngs=nnx.Rngs(0)))
    try:
        state = state_from_torch(original["state_dict"],
                                 nnx.state(abstract, (nnx.Param, nnx.BatchStat)))
    except ConversionError as e:
        raise ConversionError(f"{pth_path}: {e}") from None
    checkpoint.write_model_spec(target_dir, spec)
    # Overwriting writes a newer step, which prediction then reads.
    step = 0 if existing is None else existing + 1
    params, batch_stats = nnx.split_state(state, nnx.Param, nnx.BatchStat)
    checkpoint.save(target_dir, step, {"ema": jax.tree.map(
        lambda a: np.asarray(a, dtype=np.float32),
        {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)})})
    return target_dir


ERRORS = (ConversionError, checkpoint.CheckpointError)  # the user's: one `error:` line, exit 1


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("experiment", None, "Experiment name; unset: the .pth's grandparent "
                        "folder (e.g. true_batch_001).", flag_values=fv)
    flags.DEFINE_integer("fold", None, "Fold index 0..6; unset: k of the .pth's fold_<k> "
                         "parent folder.", flag_values=fv)
    flags.DEFINE_list("mice", None, "Mouse folder names in readout order; unset: the real ten "
                      "mice, in the original's order.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint of that fold.",
                      flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
    if len(args) != 2:
        raise cli.UsageError(f"expected ORIGINAL.pth OUT_DIR, got {args}")
    pth, workdir = Path(args[0]), args[1]
    experiment = fv.experiment or pth.resolve().parent.parent.name
    fold = fv.fold
    if fold is None:
        match = re.fullmatch(r"fold_(\d+)", pth.resolve().parent.name)
        if match is None:
            raise cli.UsageError(f"{pth}: cannot tell the fold from its folder; pass --fold K")
        fold = int(match[1])
    out = convert(pth, workdir, experiment=experiment, fold=fold, mice=fv.mice,
                  overwrite=fv.overwrite)
    spec = checkpoint.read_model_spec(out)
    print(f"converted {pth} -> {out} (experiment {experiment}, fold {fold}, "
          f"{len(spec.mice)} readouts, expansion {spec.constructor['expansion_ratio']})")
    return 0


if __name__ == "__main__":
    cli.main(__doc__, define_flags, run, errors=ERRORS)
