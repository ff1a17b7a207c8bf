"""distillation_001: the original's second-stage experiment (docs/original.md#distillation).

Expansion ratio 6 (170,058,402 parameters) and a frozen teacher, the true_batch_001 fold of the
same number in the same workdir, which fills every (sample, mouse) pair without a label: real
labels hold 64% of the loss weight, the teacher's predictions 36% (docs/training.md).

    python -m dwise_jax.train --config configs/distillation.py \
        --config.data_root=/data/sensorium_all_2023 --workdir=/workdir --folds=0

Cost: a true_batch_001 step plus a teacher forward pass and the nine readouts per sample that
true_batch_001 skips (about 15% of the forward FLOPs). The original: each fold +0.007
validation correlation; the ensemble with true_batch_001 scored 0.2913 (main), 0.2215 (bonus).
"""

from dwise_jax.config import get_base_config


def get_config():
    config = get_base_config()
    config.experiment = "distillation_001"
    config.model.expansion_ratio = 6
    config.distill.update(enabled=True, teacher_experiment="true_batch_001", ratio=0.36)
    return config
