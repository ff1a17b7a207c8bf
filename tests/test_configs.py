"""Every shipped config loads locked, takes overrides, refuses unknown keys, builds its model, and
holds the original's values (docs/original.md#training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dwise_jax import config as config_lib
from dwise_jax import optim

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.py"))


def test_configs_are_shipped():
    assert {p.stem for p in CONFIGS} >= {"true_batch", "distillation"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_locked_and_builds(path):
    from dwise_jax.models.dwiseneuro import count_parameters

    config = config_lib.load_config_file(str(path))
    config_lib.validate(config)
    with pytest.raises(AttributeError):
        config.optim.base_lr_typo = 1.0
    kwargs = config_lib.model_kwargs(config, [7, 11, 13])
    assert count_parameters(**kwargs) > 0
    assert "python -m dwise_jax.train --config configs/" in path.read_text()


def test_original_recipe_values():
    config = config_lib.load_config_file(str(CONFIG_DIR / "true_batch.py"))
    assert config.data.batch_size == 32 and config.data.train_epoch_size == 72000
    assert optim.scaled_lr(config.optim.base_lr, 32) == pytest.approx(2.4e-3)
    assert optim.scaled_lr(config.optim.min_lr, 32) == pytest.approx(2.4e-5)
    assert (config.optim.warmup_epochs, config.optim.cosine_epochs) == (3, 18)
    assert config.optim.weight_decay == 0.05 and config.optim.ema_decay == 0.999
    assert (config.data.cutmix_alpha, config.data.cutmix_prob) == (1.0, 0.5)
    assert config.model.expansion_ratio == 7 and config.optim.iter_size == 1
    assert config.model.canvas_rows == 64  # the whole 64 x 64 canvas
    distill = config_lib.load_config_file(str(CONFIG_DIR / "distillation.py"))
    assert distill.model.expansion_ratio == 6 and distill.distill.enabled
    assert distill.distill.teacher_experiment == "true_batch_001"
    assert distill.distill.ratio == 0.36


def test_overrides_and_unknown_keys():
    config = config_lib.load_config_file(str(CONFIG_DIR / "true_batch.py"), {"optim.base_lr": 1e-3})
    assert config.optim.base_lr == 1e-3
    with pytest.raises(config_lib.ConfigError, match="did you mean 'optim.base_lr'"):
        config_lib.load_config_file(str(CONFIG_DIR / "true_batch.py"), {"optim.base_rl": 1e-3})
    with pytest.raises(config_lib.ConfigError, match="no such config file"):
        config_lib.load_config_file(str(CONFIG_DIR / "nope.py"))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"data.batch_size": 30}, "must divide over 4 device"),
        ({"data.cutmix_prob": 1.5}, "cutmix_prob"),
        ({"model.compute_dtype": "float16"}, "compute_dtype"),
        ({"folds": (0, 7)}, "folds must be in 0..6"),
        ({"optim.ema_decay": 1.0}, "ema_decay"),
        ({"model.canvas_rows": 34}, "canvas_rows must be an even number from 36 to 64, got 34"),
        ({"model.canvas_rows": 37}, "canvas_rows must be an even number from 36 to 64, got 37"),
        ({"model.canvas_rows": 66}, "canvas_rows must be an even number from 36 to 64, got 66"),
    ],
)
def test_impossible_values_are_named(override, message):
    config = config_lib.load_config_file(str(CONFIG_DIR / "true_batch.py"), override)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, num_devices=4)
