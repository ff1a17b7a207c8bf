"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=4: one train step of a tiny model on
1 device and on 4 devices (batch sharded on `data`), printed as JSON for tests/test_train.py."""

import json
import sys

import jax
import numpy as np
import optax
from absl import flags
from flax import nnx

from dwise_jax import config as config_lib
from dwise_jax import sharding, train_step
from dwise_jax.data import pipeline, sensorium
from dwise_jax.models.dwiseneuro import DwiseNeuro

flags.FLAGS.mark_as_parsed()
root = sys.argv[1]
dataset = sensorium.SensoriumDataset.open(root)
config = config_lib.get_base_config()
config.seed = 3
config.data.update(batch_size=8, train_epoch_size=24, cutmix_prob=0.5, num_workers=0)
stream = pipeline.TrainStream(dataset, config, fold=0)
batch = next(stream)
stream.close()
config.model.update(core_features=(8, 8, 16), spatial_strides=(2, 2, 2), expansion_ratio=2,
                    se_reduce_ratio=4, cortex_features=(32, 64), drop_rate=0.0, drop_path_rate=0.0)
results = {}
for devices in (1, 4):
    model = DwiseNeuro(**config_lib.model_kwargs(config, dataset.num_neurons),
                       rngs=nnx.Rngs(params=0, dropout=1))
    # Plain SGD: parameter changes are then proportional to the gradients. (Adam's first step is
    # about lr * sign(g), so exactly-zero gradients in round-off would flip by 2 lr.)
    trainer = train_step.Trainer(model, optax.sgd(1e-2), ema_decay=0.9)
    mesh = sharding.make_mesh(devices)
    train, _ = train_step.jit_steps(trainer, sharding.replicated(mesh),
                                    sharding.batch_sharding(mesh))
    state = jax.device_put(trainer.init_state(), sharding.replicated(mesh))
    placed = sharding.put_batch(batch, mesh)
    assert len(placed["frames"].sharding.device_set) == devices
    state, metrics = train(state, placed)
    leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(
        (state["params"], state["batch_stats"], state["ema"]))]
    results[devices] = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                        "params": np.concatenate(leaves).tolist()}
print(json.dumps({"devices": len(jax.devices()), "results": results}))
