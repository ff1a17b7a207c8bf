"""demo: a small DwiseNeuro that trains on the bundled simulated dataset on a 2-core CPU.

The original's recipe at laptop size: a narrow 5-block core (8 -> 64 channels, expansion 2)
and cortex (128, 256), batch 8 for 2800 steps (1 epoch of warm-up, 7 of cosine), 20x the
original's learning rate per sample, EMA 0.99, readout biases started at each neuron's mean
response. How each was chosen: docs/training.md#the-demo-on-the-simulated-dataset.

    python -m dwise_jax.data.synthetic data/simulated
    python -m dwise_jax.train --config configs/demo.py

Cost: about 13 minutes per fold on a 2-core CPU (~30 samples per second, eight validations
included). Fold 0 of the default simulated dataset: val_corr 0.1970, ridge baseline 0.1950,
noise ceiling 0.4678.
"""

from __future__ import annotations

from dwise_jax.config import get_base_config


def get_config():
    config = get_base_config()
    config.experiment = "demo"
    config.folds = (0,)
    config.model.core_features = (8, 16, 32, 32, 64)
    config.model.spatial_strides = (2, 2, 1, 2, 1)
    config.model.expansion_ratio = 2
    config.model.se_reduce_ratio = 8
    config.model.cortex_features = (128, 256)
    config.model.drop_rate = 0.2
    config.model.drop_path_rate = 0.05
    config.data.batch_size = 8
    config.data.val_batch_size = 16
    config.data.train_epoch_size = 2800  # 350 steps: one validation per ~1.5 minutes
    config.data.num_workers = 0
    # Readout biases start at each neuron's mean response (the original starts them at 0, where
    # softplus beta 0.07 returns ~10, and spends hundreds of steps coming down to the scale of
    # the responses); see dwise_jax/readout_bias.py.
    config.model.readout_bias_init = "response_mean"
    # 20x the original's rate per sample, for a run of a few thousand steps.
    config.optim.base_lr = 6e-3
    config.optim.min_lr = 6e-5
    config.optim.warmup_epochs = 1
    config.optim.cosine_epochs = 7
    config.optim.ema_decay = 0.99  # 0.999 over a few thousand steps keeps the random init
    config.log.every_steps = 25
    return config
