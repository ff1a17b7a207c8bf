"""true_batch_001: the original's first-stage experiment (docs/original.md#model, #training).

All ten mice in every batch (each sample runs only its own mouse's readout), mouse-weighted
Poisson loss, CutMix, EMA, 3 warm-up epochs from lr 0 then 18 cosine epochs, 7 folds by video
hash. Expansion ratio 7: 170,656,070 parameters.

    python -m dwise_jax.train --config configs/true_batch.py \
        --config.data_root=/data/sensorium_all_2023 --workdir=/workdir --folds=0

Cost: the original took about 12 hours per fold on one RTX A6000 (21 epochs x 72,000 samples,
about 35 samples/s), 3.5 GPU-days for 7 folds. Its 7-fold ensemble scored 0.2905 (main) and
0.2207 (bonus) in the competition's final phase.
"""

from dwise_jax.config import get_base_config


def get_config():
    config = get_base_config()
    config.experiment = "true_batch_001"
    return config
