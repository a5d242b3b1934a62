"""The memory plan: bytes per device of each table, its optimizer state, activations and logits."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from recsys import sharding
from recsys.config import Config, ConfigError, MeshConfig, ModelConfig
from recsys.data.dataset import Dataset
from recsys.models.two_tower import Vocabularies
from recsys.train import state as state_lib
from recsys.train.loop import state_parts, vocabularies

LOGIT_COPIES = 3  # logits, softmax probabilities and their gradient live together in the step


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # parameter path (tables) or "other (n)" for the rest
    shape: tuple  # global shape
    row_shards: int  # devices its rows are split over (1 = whole on every device)
    param_bytes: int  # per device
    opt_bytes: int  # per device: this parameter's optimizer state


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    mesh_shape: dict  # axis -> size
    rows: list  # Row per row-sharded table, then one for everything else
    batch_rows: int  # examples of the global batch on one device
    activation_bytes: int  # per device, an estimate (see `activation_estimate`)
    logits_shape: tuple  # (B, N): global batch x candidates (B + uniform + mined negatives)
    logits_bytes: int  # per device, LOGIT_COPIES copies of its B/shards rows
    device_bytes: int | None  # memory of one device (None = unknown)
    device_source: str  # where device_bytes came from

    @property
    def total_bytes(self) -> int:
        state = sum(r.param_bytes + r.opt_bytes for r in self.rows)
        return state + self.activation_bytes + self.logits_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.total_bytes <= self.device_bytes


def abstract_two_tower_state(cfg: Config, ds: Dataset | Vocabularies, mesh):
    """ShapeDtypeStructs with shardings of the (model, optimizer) state train_retrieval builds,
    for a dataset or for table sizes alone."""
    vocab = ds if isinstance(ds, Vocabularies) else vocabularies(ds)
    return state_lib.abstract(*state_parts(cfg, vocab), cfg.train.seed, mesh)[1]


def state_rows(state) -> list[Row]:
    """A Row per table (its rows, their optimizer state) and per other row-sharded state such as
    logQ statistics, then one Row for everything else; sizes from the arrays' own shardings."""
    leaves = [(jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/value"), x)
              for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]
    for key, x in leaves:
        try:
            x.sharding.shard_shape(x.shape)
        except ValueError:  # jax's IndivisibleError
            raise ConfigError(f"{key} of shape {x.shape} does not split evenly as "
                              f"{x.sharding.spec} over mesh {dict(x.sharding.mesh.shape)}; table "
                              "rows are padded to a multiple of 128, so use a mesh size dividing "
                              "that") from None
    groups = {k[2:].removesuffix("/embedding"): x for k, x in leaves
              if k.startswith("0/") and _row_sharded(x)}  # model tables, by path
    sizes: dict[str, list[int]] = {"": [0, 0]}  # group -> [param bytes, other state bytes]
    rest = 0
    for key, x in leaves:
        # A leaf belongs to the table whose path it contains (its moments, its row state).
        owner = max((g for g in groups if f"/{g}/" in f"/{key}/"), key=len, default="")
        if not owner and _row_sharded(x):  # row state outside the model, e.g. "logq"
            owner = "/".join(key.split("/")[1:-1])
            groups.setdefault(owner, x)
        rest += not owner
        sizes.setdefault(owner, [0, 0])[0 if key.startswith("0/") else 1] += _device_bytes(x)
    rows = [Row(g, x.shape, x.shape[0] // x.sharding.shard_shape(x.shape)[0], *sizes[g])
            for g, x in groups.items()]
    return rows + [Row(f"other ({rest} arrays)", (), 1, *sizes[""])]


def _row_sharded(x) -> bool:
    return bool(x.ndim and x.sharding.spec and x.sharding.spec[0] is not None)


def _device_bytes(x) -> int:
    try:
        itemsize = np.dtype(x.dtype).itemsize
    except TypeError:  # PRNG key arrays: two uint32 words
        itemsize = 8
    return int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * itemsize


def activation_estimate(m: ModelConfig, history_len: int, batch_rows: int) -> int:
    """Rough bytes per device: history embeddings, both towers' layers, doubled for gradients."""
    tower = 4 * m.embed_dim + sum(m.hidden_dims) + m.out_dim  # inputs, hidden, output
    per_example = history_len * m.embed_dim + 2 * tower
    return 2 * batch_rows * per_example * 4


def memory_plan(state, cfg: Config, mesh) -> MemoryPlan:
    """The plan for `state` (arrays or ShapeDtypeStructs carrying shardings) on `mesh`."""
    b, tc = cfg.train.batch_size, cfg.train
    shards = sharding.batch_shards(mesh)
    if b % shards:
        raise ConfigError(f"train.batch_size={b} does not split evenly over the {shards} batch "
                          f"shards of mesh {dict(mesh.shape)}; use a multiple")
    rows_per_device = b // shards
    n = b + tc.uniform_negatives + tc.mined_negatives
    device_bytes, source = device_memory(cfg.mesh)
    return MemoryPlan(dict(mesh.shape), state_rows(state), rows_per_device,
                      activation_estimate(cfg.model, cfg.data.history_len, rows_per_device), (b, n),
                      LOGIT_COPIES * rows_per_device * n * 4, device_bytes, source)


def device_memory(cfg: MeshConfig) -> tuple[int | None, str]:
    """Bytes of one device: the config, else the device's own report, else a share of host RAM."""
    if cfg.device_memory_gib:
        return int(cfg.device_memory_gib * 2**30), "mesh.device_memory_gib"
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform} memory_stats"
    if device.platform == "cpu":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        n = jax.local_device_count()
        return ram // n, f"host RAM / {n} CPU devices"
    return None, "unknown: pass --device-memory GIB"


def for_dataset(cfg: Config, ds: Dataset, mesh) -> MemoryPlan:
    """The plan of the two-tower model for `ds` on a Mesh or an AbstractMesh."""
    return memory_plan(abstract_two_tower_state(cfg, ds, mesh), cfg, mesh)


def for_sizes(cfg: Config, num_users: int, num_items: int, mesh) -> MemoryPlan:
    """The plan for a catalogue of `num_items` and `num_users` without reading any data (the
    features' widths from the config: data.num_genres genres, no user features)."""
    vocab = Vocabularies(num_users=num_users + 1, num_items=num_items + 1,
                         num_genres=cfg.data.num_genres, history_len=cfg.data.history_len)
    return memory_plan(abstract_two_tower_state(cfg, vocab, mesh), cfg, mesh)


def planning_mesh(cfg: MeshConfig) -> jax.sharding.AbstractMesh:
    """The mesh the config asks for, without needing its devices (-1 takes this host's count)."""
    if cfg.data == -1:
        return sharding.make_mesh(cfg).abstract_mesh
    return jax.sharding.AbstractMesh((cfg.data, cfg.model), sharding.AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * 2)


def format_plan(plan: MemoryPlan) -> str:
    """One compact table of bytes per device."""
    devices = int(np.prod(list(plan.mesh_shape.values())))
    lines = [f"memory plan, per device (mesh {dict(plan.mesh_shape)}: {devices} devices)"]

    def line(name, what, size):
        lines.append(f"  {name:18s} {what:44s} {size}")

    for r in plan.rows:
        what = (f"{' x '.join(map(str, r.shape))}, rows / {r.row_shards}" if r.shape
                else "whole on every device")
        line(r.name, what, f"params {_size(r.param_bytes)} + optimizer {_size(r.opt_bytes)}")
    b, n = plan.logits_shape
    line("activations", f"estimate, {plan.batch_rows} examples", _size(plan.activation_bytes))
    line("logits", f"{b} x {n} f32: {plan.batch_rows} rows, x{LOGIT_COPIES} (probs, grad)",
         _size(plan.logits_bytes))
    verdict = {True: "fits", False: "DOES NOT FIT", None: "fit unknown"}[plan.fits]
    limit = _size(plan.device_bytes) if plan.device_bytes else "?"
    line("total", f"of {limit} ({plan.device_source})", f"{_size(plan.total_bytes)}: {verdict}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
