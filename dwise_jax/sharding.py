"""Data parallelism: a 1-D device mesh, batches sharded on its `data` axis, parameters replicated.
Several processes: `initialize_distributed` first, then each reads its own rows of every batch
(docs/design.md#several-devices-and-hosts)."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# What launch/multihost.sh sets for every process (and `initialize_distributed` reads).
LAUNCH_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when the launcher asked for several processes
    (`LAUNCH_VARIABLES`, or a SLURM step of several tasks); returns whether it did."""
    explicit = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ
    if not (explicit or slurm):
        return False
    # Collectives between processes on the CPU backend (a no-op for GPU and TPU devices).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"heartbeat_timeout_seconds": int(os.environ.get("DWISE_JAX_HEARTBEAT_S", "100"))}
    if explicit:
        address, count, index = (os.environ[k] for k in LAUNCH_VARIABLES)
        kwargs.update(coordinator_address=address, num_processes=int(count),
                      process_id=int(index))
    jax.distributed.initialize(**kwargs)
    return True


def is_main_process() -> bool:
    """Process 0: the one that writes files other than Orbax's and prints progress."""
    return jax.process_index() == 0


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of an array sharded on its leading (batch) axis, in order: the rows
    that this process fed to `put_batch` (the whole array on one process)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    shards = {s.index[0].start or 0: s for s in array.addressable_shards}
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def sum_over_processes(tree: Any) -> Any:
    """The sum over processes of a pytree of host numbers and arrays, on every process."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(jax.tree.map(np.asarray, tree))
    return jax.tree.map(lambda a: np.sum(np.asarray(a), axis=0), gathered)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over all (or the first `num_devices`) devices, axis `data`, Auto axis type."""
    devices = jax.devices()[:num_devices]
    return jax.make_mesh((len(devices),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, every other axis whole."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """The whole array on every device (parameters, optimizer state, EMA)."""
    return NamedSharding(mesh, P())


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, sharded on the batch axis. With several processes
    `batch` is this process's share (rows process_index * B / P ...) of the global batch."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Puts every leaf of a pytree on every device of the mesh (with several processes, from
    host copies: every process holds the same values)."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), sharding)

    return jax.tree.map(put, tree)
