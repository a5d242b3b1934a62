"""The one mesh, the one logical-axis rules table, batch placement and multi-process start-up."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from recsys.config import ConfigError, MeshConfig

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
    data, model = cfg.data, cfg.model  # sizes already checked by MeshConfig
    if data == -1:
        if n % model:
            raise ConfigError(f"mesh.model={model} does not divide the {n} devices")
        data = n // model
    if data * model != n:
        raise ConfigError(f"mesh.data={data} x mesh.model={model} = {data * model} devices, "
                         f"but {n} are available")
    return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_spec(stacked: bool = False) -> P:
    """Rows split along the batch axes; `stacked`: batches stacked along a leading step axis."""
    return P(None, dict(RULES)["batch"]) if stacked else P(dict(RULES)["batch"])


def shard_batch(batch, mesh: jax.sharding.Mesh, stacked: bool = False):
    """Places this process's rows of a global batch on the mesh, split along the batch axis.

    `batch` is any pytree of arrays (model inputs, recsys.train.negatives.Negatives), each with
    rows along its first axis (its second with `stacked`: [k, rows, ...], k steps' batches).
    Each process passes only its own rows: those `process_rows(mesh, rows)` names, in that order
    (global rows / process count of them).
    """
    sharding = NamedSharding(mesh, batch_spec(stacked))
    row_axis = int(stacked)
    if jax.process_count() == 1:  # every row is this process's: one transfer of the whole tree
        return jax.device_put(jax.tree.map(np.asarray, batch), sharding)

    def place(x):
        x = np.asarray(x)
        global_shape = list(x.shape)
        global_shape[row_axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

    return jax.tree.map(place, batch)


def process_rows(mesh: jax.sharding.Mesh, global_batch: int) -> np.ndarray:
    """Rows of every global batch that this process feeds, in the order `shard_batch` reads them.

    A process owns the rows of its own devices' shards. Where those are depends on where the
    mesh put its devices (contiguous blocks in process order for CPU meshes, other patterns on
    TPU topologies), so this asks the batch sharding instead of assuming `process_index`.
    """
    sharding = NamedSharding(mesh, batch_spec())
    shards = batch_shards(mesh)
    if global_batch % shards:
        raise ConfigError(f"a global batch of {global_batch} rows does not split evenly over the "
                          f"{shards} batch shards of mesh {dict(mesh.shape)}; use a multiple")
    spans = {(idx[0].start or 0, global_batch if idx[0].stop is None else idx[0].stop)
             for idx in sharding.addressable_devices_indices_map((global_batch,)).values()}
    return np.concatenate([np.arange(lo, hi) for lo, hi in sorted(spans)])


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    """How many pieces a global batch is split into (devices along the batch's mesh axes)."""
    axes = dict(RULES)["batch"]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def to_host(x) -> np.ndarray:
    """A numpy copy of a jax array that may span processes (then a collective: all must call)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def local_copy(tree):
    """`tree` with every array whole on this process's first device, e.g. a model to export.

    A collective when arrays span processes: every process must call it, in the same order.
    """
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        whole = jax.jit(lambda a: a, out_shardings=NamedSharding(x.sharding.mesh, P()))(x)
        return whole.addressable_data(0)

    return jax.tree.map(one, tree)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def maybe_initialize_distributed() -> None:
    """Starts JAX's multi-controller runtime when this is one of several processes.

    Explicit (launch/local.py, GKE GPU pools): RECSYS_COORDINATOR=host:port,
    RECSYS_NUM_PROCESSES, RECSYS_PROCESS_ID. Otherwise jax's own cluster detection runs inside a
    multi-task `srun` step (SLURM) and on multi-host TPU slices that say so in the environment
    (GKE); RECSYS_DISTRIBUTED=auto forces it (Cloud TPU VMs keep their worker list in the VM
    metadata; launch/tpu_vm.sh sets it) and RECSYS_DISTRIBUTED=off disables all of this.
    """
    env = os.environ
    mode = env.get("RECSYS_DISTRIBUTED", "")
    if mode not in ("", "auto", "off"):
        raise ConfigError(f"RECSYS_DISTRIBUTED={mode!r}: must be auto, off or unset")
    if mode == "off" or jax.distributed.is_initialized():
        return
    timeouts = {"initialization_timeout": _env_int("RECSYS_INIT_TIMEOUT", 300),
                "heartbeat_timeout_seconds": _env_int("RECSYS_HEARTBEAT_TIMEOUT", 60)}
    if env.get("RECSYS_COORDINATOR"):
        jax.distributed.initialize(coordinator_address=env["RECSYS_COORDINATOR"],
                                   num_processes=_env_int("RECSYS_NUM_PROCESSES"),
                                   process_id=_env_int("RECSYS_PROCESS_ID"), **timeouts)
    elif (mode == "auto" or _env_int("SLURM_STEP_NUM_TASKS", 1) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS")):
        jax.distributed.initialize(**timeouts)


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"environment variable {name}={text!r}: expected an integer") from None
