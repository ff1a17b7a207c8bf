"""distillation_001: the original's second-stage experiment
(docs/original.md#distillation).

The same recipe with expansion ratio 6 (170,058,402 parameters) and a frozen teacher: the
true_batch_001 checkpoint of the same fold fills every (sample, mouse) pair without a label, so
that real labels hold 64% of the loss weight and the teacher's predictions 36%.

    python -m dwise_jax.train --config configs/distillation.py \
        --config.data_root=/data/sensorium_all_2023 --workdir=/workdir --folds=0

Needs the true_batch_001 fold in the same workdir (`<workdir>/true_batch_001/fold_<k>/`, its
last EMA checkpoint, rebuilt with its own expansion 7); training stops with an error naming that
folder before the first step if it is missing or was trained on other mice. The teacher, in eval
mode, predicts all ten readouts on the same CutMixed batch, and the student runs all ten
readouts too (the loss covers every (sample, mouse) pair), so a step costs more than a
true_batch_001 step: a teacher forward pass, plus the nine readouts per sample that
true_batch_001 skips (about 15% of the forward FLOPs). The original: each fold +0.007
validation correlation; the ensemble with true_batch_001 scored 0.2913 (main) and 0.2215 (bonus).
"""

from __future__ import annotations

from dwise_jax.config import get_base_config


def get_config():
    config = get_base_config()
    config.experiment = "distillation_001"
    config.model.expansion_ratio = 6
    config.distill.enabled = True
    config.distill.teacher_experiment = "true_batch_001"
    config.distill.ratio = 0.36
    return config
