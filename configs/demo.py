"""demo: a small DwiseNeuro that trains on the bundled simulated dataset on a 2-core CPU.

The original's recipe at a size and budget that fit a laptop CPU: a 4-block core, a narrow
cortex, batch 8, a short warm-up and cosine, and an EMA decay suited to a few hundred steps (0.999
over a few hundred steps would keep most of the random initial weights).

    python -m dwise_jax.data.synthetic data/simulated
    python -m dwise_jax.train --config configs/demo.py --folds 0

Cost: about 14 minutes per fold on a 2-core CPU (700 steps of batch 8 at ~9 samples per second,
validation included). Fold 0 of the default simulated dataset: val_corr 0.172 (ridge baseline
0.195, noise ceiling 0.468); see the README.
"""

from __future__ import annotations

from dwise_jax.config import get_base_config


def get_config():
    config = get_base_config()
    config.experiment = "demo"
    config.folds = (0,)
    config.model.core_features = (16, 16, 32, 32, 64)
    config.model.spatial_strides = (2, 2, 1, 2, 1)
    config.model.expansion_ratio = 3
    config.model.se_reduce_ratio = 8
    config.model.cortex_features = (128, 256)
    config.model.drop_rate = 0.2
    config.model.drop_path_rate = 0.05
    config.data.batch_size = 8
    config.data.val_batch_size = 16
    config.data.train_epoch_size = 800
    config.data.num_workers = 0
    # 20x the original's rate per sample: the readouts must first bring the softplus outputs
    # from ~10 at initialisation down to the responses' scale, within a few hundred steps.
    config.optim.base_lr = 6e-3
    config.optim.min_lr = 6e-5
    config.optim.warmup_epochs = 1
    config.optim.cosine_epochs = 6
    config.optim.ema_decay = 0.99
    config.log.every_steps = 25
    return config
