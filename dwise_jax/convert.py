"""`python -m dwise_jax.convert ORIGINAL.pth OUT_DIR`: the original's weights as a dwise_jax fold.

Reads one of the original's `model-<epoch>-<val_corr>.pth` files with
`torch.load(weights_only=True)`, checks its pipeline settings, maps the EMA state dict onto the
Flax NNX model and writes a fold folder that prediction uses like a fold trained here
(docs/prediction.md#the-originals-weights). Needs torch (CPU): `pip install torch==2.13.0`.

    python -m dwise_jax.convert true_batch_001/fold_0/model-017-0.293169.pth workdir \\
        --experiment true_batch_001 --fold 0
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from dwise_jax import checkpoint, cli
from dwise_jax import config as config_lib
from dwise_jax.data.sensorium import REAL_MICE

# The input pipeline the weights were trained with must be the one we implement.
EXPECTED_FRAME_STACK = {"size": 16, "step": 2, "position": "last"}
EXPECTED_INPUTS_PROCESSOR = ("stack_inputs", {"size": (64, 64), "pad_fill_value": 0.0})
FILE_NAME = re.compile(r"model-(?P<epoch>\d+)-(?P<score>-?\d+(?:\.\d+)?)\.pth$")


class ConversionError(ValueError):
    """The .pth file is not one of the original's DwiseNeuro checkpoints, or does not fit."""


def load_original(path: str | Path) -> dict[str, Any]:
    """Reads an original checkpoint with torch's safe loader; arrays come back as NumPy.

    Returns:
      {"params": the params dict with tensors left as they are, "state_dict": {name: ndarray}}.
    """
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
    state_dict = {}
    for name, tensor in raw["nn_state_dict"].items():
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(f"{path}: state-dict entry {name} is not a tensor")
        state_dict[name] = tensor.detach().cpu().numpy()
    return {"params": raw["params"], "state_dict": state_dict}


def _load_failure(error: Exception) -> str:
    """torch.load's reason in one line: its unpickler's first sentence, without the advice
    around it (which suggests weights_only=False)."""
    text = str(error) or type(error).__name__
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    reason = match[1].split(". ")[0] if match else text
    return " ".join(reason.split())


def _as_plain(value: Any) -> Any:
    """Tuples to lists, recursively, so pipeline settings compare whatever sequences they hold."""
    if isinstance(value, (list, tuple)):
        return [_as_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    return value


def constructor_kwargs(params: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, Any]:
    """The DwiseNeuro constructor arguments of an original checkpoint, checked.

    They are set on a locked `config.model`, so an unknown argument or a value of another type
    is refused; `readout_outputs` comes from the data. A missing argument keeps the config's
    value (a differing architecture then fails the state-dict mapping). Also checks the frame
    stack and input processor stored beside them.
    """
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
    unknown = sorted(set(kwargs) - set(config.model))
    if unknown:
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
    _check_pipeline(params, path)
    return config_lib.model_kwargs(config, readout_outputs)


def _check_pipeline(params: dict[str, Any], path: str | Path) -> None:
    frame_stack = params.get("frame_stack")
    if frame_stack is not None and dict(frame_stack) != EXPECTED_FRAME_STACK:
        raise ConversionError(
            f"{path}: frame_stack {frame_stack} differs from {EXPECTED_FRAME_STACK}, "
            "the only input windowing dwise_jax implements")
    processor = params.get("inputs_processor")
    if processor is not None and _as_plain(processor) != _as_plain(EXPECTED_INPUTS_PROCESSOR):
        raise ConversionError(
            f"{path}: inputs_processor {processor} differs from {EXPECTED_INPUTS_PROCESSOR}")


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


def _check_finite(state_dict: dict[str, np.ndarray], path: str | Path) -> None:
    for name, array in state_dict.items():
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise ConversionError(f"{path}: state-dict entry {name} holds NaN or infinity")


def convert(pth_path: str | Path, workdir: str | Path, *, experiment: str, fold: int,
            mice: list[str] | None = None, overwrite: bool = False) -> Path:
    """Converts one original .pth into fold `fold` of `experiment` under `workdir`.

    Args:
      pth_path: the original checkpoint (`model-<epoch>-<val_corr>.pth`).
      workdir: the dwise_jax work folder; the fold goes to `<workdir>/<experiment>/fold_<k>`.
      experiment: experiment name, e.g. "true_batch_001".
      fold: the fold index the weights were trained for (validated on), 0..6.
      mice: mouse folder names in readout order. Default: the real ten mice in the original's
        order, which is what the published weights were trained on; required otherwise.
      overwrite: replace an existing checkpoint of that fold instead of refusing.

    Returns:
      The fold folder.
    """
    from flax import nnx

    from dwise_jax.models.dwiseneuro import DwiseNeuro
    from dwise_jax.models.torch_mapping import StateDictMismatch, state_from_torch

    if not 0 <= fold < 7:
        raise ConversionError(f"fold must be in 0..6, got {fold}")
    original = load_original(pth_path)
    kwargs = constructor_kwargs(original["params"], pth_path)
    _check_finite(original["state_dict"], pth_path)
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
    target = nnx.state(abstract, (nnx.Param, nnx.BatchStat))
    try:
        state = state_from_torch(original["state_dict"], target)
    except StateDictMismatch as e:
        raise ConversionError(f"{pth_path}: {e}") from None
    checkpoint.write_model_spec(target_dir, spec)
    # Overwriting writes a newer step, which prediction then reads.
    step = 0 if existing is None else existing + 1
    params, batch_stats = nnx.split_state(state, nnx.Param, nnx.BatchStat)
    checkpoint.save(target_dir, step, {"ema": _to_numpy({
        "params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)})})
    return target_dir


def _to_numpy(tree: Any) -> Any:
    import jax

    return jax.tree.map(lambda a: np.asarray(a, dtype=np.float32), tree)


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
    cli.main(__doc__, define_flags, run, errors=(ConversionError, checkpoint.CheckpointError))
