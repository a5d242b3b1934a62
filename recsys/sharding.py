"""The one mesh, the one logical-axis rules table, batch placement and multi-process start-up."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from recsys.config import MeshConfig

AXES = ("data", "model")

# Logical axis -> mesh axes. Changing a layout is a one-line change here.
RULES = (
    ("batch", ("data", "model")),  # examples split over every device (no duplicated batch work)
    ("vocab", ("data", "model")),  # embedding rows: no device ever holds a whole table
    ("embed", None),  # embedding width stays whole (rows are the large dimension)
    ("hidden", None),  # MLP widths are small next to the tables
)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A ('data', 'model') mesh over all devices of all processes; -1 takes the remaining ones."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    data, model = cfg.data, cfg.model
    if model <= 0 or (data <= 0 and data != -1):
        raise ValueError(f"mesh.data={data}, mesh.model={model}: use positive sizes (data may be -1)")
    if data == -1:
        if n % model:
            raise ValueError(f"mesh.model={model} does not divide the {n} devices")
        data = n // model
    if data * model != n:
        raise ValueError(f"mesh.data={data} x mesh.model={model} = {data * model} devices, "
                         f"but {n} are available")
    return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_spec() -> P:
    return P(dict(RULES)["batch"])


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Places this process's rows of a global batch on the mesh, split along the batch axis.

    Each process passes only its own rows (global batch / process count, in process order).
    """
    sharding = NamedSharding(mesh, batch_spec())

    def place(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return {k: place(v) for k, v in batch.items()}


def batch_shardings(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    return {k: NamedSharding(mesh, batch_spec()) for k in batch}


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def maybe_initialize_distributed() -> None:
    """Starts JAX's multi-controller runtime when launched as one of several processes.

    Cloud TPU and SLURM are detected by `jax.distributed.initialize()` itself; other launchers
    (launch/local.py, GKE JobSet) set RECSYS_COORDINATOR, RECSYS_NUM_PROCESSES, RECSYS_PROCESS_ID.
    """
    if jax.distributed.is_initialized():
        return
    coordinator = os.environ.get("RECSYS_COORDINATOR")
    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["RECSYS_NUM_PROCESSES"]),
            process_id=int(os.environ["RECSYS_PROCESS_ID"]),
            initialization_timeout=int(os.environ.get("RECSYS_INIT_TIMEOUT", "120")),
            heartbeat_timeout_seconds=int(os.environ.get("RECSYS_HEARTBEAT_TIMEOUT", "30")))
    elif "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        jax.distributed.initialize()
    elif "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]:
        jax.distributed.initialize()
