"""demo_distillation: the original's second experiment at the demo's size, on the simulated data.

The demo model distilled from the `demo` experiment of the same fold (train it first, into the
same workdir), then both blended as the original blends its two experiments:

    python -m dwise_jax.train --config configs/demo.py
    python -m dwise_jax.train --config configs/demo_distillation.py
    python -m dwise_jax.predict --experiment demo --split folds --anchor_stride 8
    python -m dwise_jax.predict --experiment demo_distillation --split folds --anchor_stride 8
    python -m dwise_jax.predict --experiment demo,demo_distillation --split folds --blend_only

Cost: a step runs the teacher and all readouts (about 1.2x a demo step); 1400 steps of batch 8
took 7.6 minutes on a 2-core Intel Xeon CPU (2026-12-07). Fold 0 of the default simulated
dataset: val_corr 0.1943 (the demo teacher: 0.1971); both stages and their ensemble:
docs/prediction.md.
"""

import runpy
from pathlib import Path


def get_config():
    # configs/demo.py by path: this file may be run from any folder.
    config = runpy.run_path(str(Path(__file__).with_name("demo.py")))["get_config"]()
    config.experiment = "demo_distillation"
    config.distill.update(enabled=True, teacher_experiment="demo", ratio=0.36)
    config.optim.cosine_epochs = 3
    return config
