"""Experiment configs: the default of every setting (the original's true_batch_001 recipe).

Configs are loaded locked (a typo in an override is an error) and code never repeats a default;
experiment files change only what differs.
"""

from __future__ import annotations

import difflib
import re
import runpy
from pathlib import Path

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "true_batch_001"
    # Where the Sensorium 2023 root (mouse folders) lies, and where experiments are written.
    config.data_root = "data/simulated"
    config.workdir = "workdir"
    config.seed = 0
    # Folds to train; each fold k trains on the other six and validates on k.
    config.folds = (0, 1, 2, 3, 4, 5, 6)

    # The true_batch_001 architecture (docs/original.md#model); readout sizes come from the data.
    config.model = ml_collections.ConfigDict()
    config.model.in_channels = 5
    config.model.core_features = (64, 64, 64, 64, 128, 128, 128, 256, 256)
    config.model.spatial_strides = (2, 1, 1, 1, 2, 1, 1, 2, 1)
    config.model.spatial_kernel = 3
    config.model.temporal_kernel = 5
    config.model.expansion_ratio = 7
    config.model.se_reduce_ratio = 32
    config.model.cortex_features = (1024, 2048, 4096)
    config.model.groups = 2
    config.model.softplus_beta = 0.07
    config.model.drop_rate = 0.4
    config.model.drop_path_rate = 0.1
    # The training forward pass: "float32" or "bfloat16" (the original: fp16 autocast). Weights,
    # statistics and loss stay float32; validation and prediction run in float32, as originally.
    config.model.compute_dtype = "float32"
    # Readout bias start: "zeros" (the original) or "response_mean" (softplus returns each
    # neuron's mean response at the start; for short runs, see dwise_jax/readout_bias.py).
    config.model.readout_bias_init = "zeros"
    # How (not what) depthwise convolutions compute: "auto" (the tap sum on CPU, XLA's grouped
    # convolution on GPU/TPU, resolved where the model runs; models/depthwise.py), "taps", "lax".
    config.model.depthwise_impl = "auto"
    # The middle rows of the 64-row input canvas that the core sees: 64 (all, the original) or
    # fewer, down to 36 (the video's own rows, without the zero rows above and below: the demo's
    # train step 1.7x faster on a CPU; docs/data.md). 64 - canvas_rows must be even (centred).
    config.model.canvas_rows = 64

    config.data = ml_collections.ConfigDict()
    config.data.batch_size = 32  # global batch, split over all devices
    config.data.train_epoch_size = 72000  # samples per epoch, equal shares per mouse
    config.data.val_batch_size = 32
    config.data.num_workers = 2  # Grain worker processes for the training stream
    config.data.prefetch_buffer_size = 4
    config.data.cutmix_alpha = 1.0
    config.data.cutmix_prob = 0.5

    config.optim = ml_collections.ConfigDict()
    config.optim.base_lr = 3e-4  # per 4 samples; scaled linearly with the batch size
    config.optim.min_lr = 3e-6  # per 4 samples
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 3
    config.optim.cosine_epochs = 18
    config.optim.ema_decay = 0.999
    config.optim.iter_size = 1  # gradient accumulation: the batch is split into iter_size chunks

    config.distill = ml_collections.ConfigDict()
    config.distill.enabled = False
    config.distill.teacher_experiment = "true_batch_001"
    config.distill.ratio = 0.36

    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 50
    config.log.tensorboard = True
    config.log.plot = True
    return config


# Experiment names become folders under the workdir: no separators, no "..".
_FOLDER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# The config.model settings that are not DwiseNeuro arguments: how training computes and starts.
TRAINING_ONLY = ("compute_dtype", "readout_bias_init")


class ConfigError(ValueError):
    """An experiment config holds an impossible or inconsistent value."""


def load_config_file(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Loads `get_config()` of a config file, applies dotted overrides ({"optim.base_lr": 1e-3}:
    an unknown key is an error), returns it locked."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such config file")
    module = runpy.run_path(str(file))
    if "get_config" not in module:
        raise ConfigError(f"{file}: defines no get_config()")
    try:
        config = module["get_config"]()
    except TypeError as e:  # a value of another type than the default's
        raise ConfigError(f"{file}: {e}") from None
    config.lock()
    check_keys(overrides or {})
    for key, value in (overrides or {}).items():
        try:
            config.update_from_flattened_dict({key: value})  # locked: refuses a change of type
        except TypeError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
    return config


def _leaves(config: ml_collections.ConfigDict, prefix: str = ""):
    """(dotted key, value) of every setting."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_keys(keys, suffix: str = "") -> None:
    """Raises ConfigError, with the closest setting, for the first dotted key that names no
    setting of `get_base_config()`."""
    known = [key for key, _ in _leaves(get_base_config())]
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}{suffix}")


def model_kwargs(config: ml_collections.ConfigDict, readout_outputs: list[int]) -> dict:
    """DwiseNeuro's keyword arguments (JSON-friendly: tuples as lists): every `config.model`
    setting but the training-only ones, and the data's neuron count of each readout."""
    kwargs = {key: list(value) if isinstance(value, (tuple, list)) else value
              for key, value in config.model.items() if key not in TRAINING_ONLY}
    return {"readout_outputs": [int(n) for n in readout_outputs], **kwargs}


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Raises ConfigError naming the field for unknown keys and impossible values."""
    # An experiment file builds on the unlocked base config, where a misspelt key would add a
    # new, unused setting. (A value of another type is refused by ml_collections itself.)
    check_keys((key for key, _ in _leaves(config)),
               "; every setting has its default in dwise_jax/config.py")
    d, o, m = config.data, config.optim, config.model
    checks = [
        (all(_FOLDER_NAME.fullmatch(name) for name in (config.experiment,
                                                        config.distill.teacher_experiment)),
         "experiment and distill.teacher_experiment must be plain folder names (letters, "
         f"digits, _ . -), got {config.experiment!r} and {config.distill.teacher_experiment!r}"),
        (d.batch_size > 0, "data.batch_size must be positive"),
        (o.iter_size >= 1, f"optim.iter_size must be >= 1, got {o.iter_size}"),
        (o.iter_size >= 1 and d.batch_size % (num_devices * o.iter_size) == 0,
         f"data.batch_size={d.batch_size} must divide over {num_devices} device(s) x "
         f"optim.iter_size={o.iter_size}"),
        (d.val_batch_size > 0 and d.val_batch_size % num_devices == 0,
         f"data.val_batch_size={d.val_batch_size} must be positive and divide over "
         f"{num_devices} device(s)"),
        (d.num_workers >= 0, "data.num_workers must be >= 0"),
        (config.log.every_steps >= 1, "log.every_steps must be >= 1"),
        (d.train_epoch_size >= d.batch_size, "data.train_epoch_size must be >= data.batch_size"),
        (0.0 <= d.cutmix_prob <= 1.0, "data.cutmix_prob must be in [0, 1]"),
        (d.cutmix_alpha > 0, "data.cutmix_alpha must be positive"),
        (o.base_lr > 0 and o.min_lr >= 0, "optim.base_lr must be > 0 and optim.min_lr >= 0"),
        (o.warmup_epochs >= 0 and o.cosine_epochs > 0,
         "optim.warmup_epochs must be >= 0 and optim.cosine_epochs > 0"),
        (0.0 <= o.ema_decay < 1.0, "optim.ema_decay must be in [0, 1)"),
        (m.compute_dtype in ("float32", "bfloat16"),
         f"model.compute_dtype must be float32 or bfloat16, got {m.compute_dtype!r}"),
        (m.readout_bias_init in ("zeros", "response_mean"),
         f"model.readout_bias_init must be zeros or response_mean, got {m.readout_bias_init!r}"),
        (m.depthwise_impl in ("auto", "taps", "lax"),
         f"model.depthwise_impl must be auto, taps or lax, got {m.depthwise_impl!r}"),
        (type(m.canvas_rows) is int and 36 <= m.canvas_rows <= 64 and m.canvas_rows % 2 == 0,
         f"model.canvas_rows must be an even number from 36 to 64, got {m.canvas_rows!r}"),
        (len(m.core_features) == len(m.spatial_strides),
         "model.core_features and model.spatial_strides must have the same length"),
        (all(type(v) is int and v > 0
             for v in (*m.core_features, *m.spatial_strides, *m.cortex_features)),
         "model.core_features, model.spatial_strides and model.cortex_features must hold "
         "positive integers"),
        (0.0 <= m.drop_rate < 1.0 and 0.0 <= m.drop_path_rate < 1.0,
         "model.drop_rate and model.drop_path_rate must be in [0, 1)"),
        (len(config.folds) > 0 and all(type(k) is int and 0 <= k < 7 for k in config.folds),
         f"folds must be in 0..6, got {config.folds}"),
        (0.0 < config.distill.ratio < 1.0, "distill.ratio must be in (0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
