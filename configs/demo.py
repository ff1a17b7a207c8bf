"""demo: a small DwiseNeuro that trains on the bundled simulated dataset on a 2-core CPU.

The original's recipe at laptop size: a narrow 5-block core (8 -> 64 channels, expansion 2) and
cortex (128, 256) that sees only the video's 36 rows of the 64-row input canvas (the 28 zero
rows cost 1.7x per step; docs/data.md), batch 8 for 3150 steps (1 epoch of warm-up, 8 of
cosine), 20x the original's learning rate per sample, EMA 0.99 (0.999 keeps the random init
over a few thousand steps), readout biases started at each neuron's mean response (the
original's 0 gives softplus ~10 and hundreds of steps to come down). Why:
docs/training.md#the-demo-on-the-simulated-dataset.

    python -m dwise_jax.data.synthetic data/simulated
    python -m dwise_jax.train --config configs/demo.py

Cost: about 10.5 minutes per fold on a 2-core Intel Xeon CPU (~46 samples per second, ten
validations included; 2026-12-07). Fold 0 of the default simulated dataset: val_corr 0.1972,
ridge baseline 0.1950, noise ceiling 0.4678.
"""

from dwise_jax.config import get_base_config


def get_config():
    config = get_base_config()
    config.experiment = "demo"
    config.folds = (0,)
    config.model.update(core_features=(8, 16, 32, 32, 64), spatial_strides=(2, 2, 1, 2, 1),
                        expansion_ratio=2, se_reduce_ratio=8, cortex_features=(128, 256),
                        drop_rate=0.2, drop_path_rate=0.05, readout_bias_init="response_mean",
                        canvas_rows=36)
    # 2800 samples = 350 steps per epoch: one validation per ~1.5 minutes.
    config.data.update(batch_size=8, val_batch_size=16, train_epoch_size=2800, num_workers=0)
    config.optim.update(base_lr=6e-3, min_lr=6e-5, warmup_epochs=1, cosine_epochs=8,
                        ema_decay=0.99)
    config.log.every_steps = 25
    return config
