"""Data parallelism: a 1-D device mesh, batches sharded on its `data` axis, parameters replicated.

This is how dwise_jax runs on many GPUs and many hosts: `jax.jit` over a `jax.make_mesh` mesh
with `NamedSharding`s (JAX's current replacement for the legacy `jax.pmap`). The compiled train
step sees the global batch; XLA inserts the all-reduces for the gradients and for BatchNorm's
batch statistics, so a step on N devices computes what one device would on the whole batch.

Multi-host: every process calls `initialize_distributed()` first (it reads the coordinator from
the environment that the launcher sets), loads its own share of each global batch, and
`put_batch` assembles the global array from the per-process pieces.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when the launcher asked for several processes.

    Recognised: `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID` (explicit),
    or a SLURM job step with more than one task (JAX detects SLURM by itself). Returns whether it
    initialised.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ:
        jax.distributed.initialize()
        return True
    return False


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over all (or the first `num_devices`) devices, axis `data`, Auto axis type."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, {len(devices)} available")
        devices = devices[:num_devices]
    return jax.make_mesh((len(devices),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, every other axis whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The whole array on every device (parameters, optimizer state, EMA)."""
    return NamedSharding(mesh, P())


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, sharded on the batch axis.

    On one process `batch` is the global batch. On several processes it is this process's
    share (rows process_index * B / P ... of the global batch), and the global array is
    assembled from every process's share.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Puts every leaf of a pytree on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
