"""Sharded training on 8 fake CPU devices: throughput, step time vs table rows, memory, equality.

    python -m benchmarks.sharding --json docs/sharding.json   # then: python -m benchmarks.report

Writes JSON with:
  examples_per_sec             {devices: examples/s} on (n, 1) meshes of 1, 2, 4, 8 devices
  step_seconds                 {dense|sparse: {rows: median s}} for item tables of 1e4 and 2e6
                               rows on the 8-device mesh, measured alternately in one loop
  step_time_ratio_large_vs_small_vocab        sparse updates (the "done" figure, <= 1.5)
  step_time_ratio_large_vs_small_vocab_dense  dense optax updates, for comparison
  *_1_device                   the same three on one device (no per-device duplication)
  table_bytes_per_device_ratio, num_row_shards  one device's shard of the large item table
  max_abs_diff_vs_single_device               parameters after 3 adagrad steps, 8 vs 1 device
  max_abs_diff_vs_single_device_sparse        the same with row-wise Adagrad on the tables
  provenance                   command, commit, recsys source hash, load average
Fake devices share the host's cores, so more devices give no speed-up here, and work that
every device repeats (the sparse path's per-lookup arrays, the dense lookups' gathered
embeddings) costs 8x; the figures show that sparse step time does not grow with table rows.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import json
import pathlib
import statistics
import time

import jax
import numpy as np

jax.config.update("jax_num_cpu_devices", 8)

from benchmarks import provenance
from recsys import sharding
from recsys.config import MeshConfig, ModelConfig, TrainConfig
from recsys.models.two_tower import TwoTower, Vocabularies
from recsys.train import state as state_lib
from recsys.train import steps
from recsys.train.negatives import Negatives

MODEL = ModelConfig(embed_dim=32, hidden_dims=(64,), out_dim=32, use_features=False)
HISTORY = 20  # L: history items per example (the item table is read B * (L + 1) times a step)
USERS = 10_000  # user table rows (fixed; the item table is the one that grows)


def make_batch(rng, batch_size: int, num_items: int) -> dict:
    """Uniform random ids: the most distinct rows per step, the worst case for sparse updates."""
    return {"user": rng.integers(1, USERS, batch_size).astype(np.int32),
            "history": rng.integers(0, num_items, (batch_size, HISTORY)).astype(np.int32),
            "item": rng.integers(1, num_items, batch_size).astype(np.int32),
            "negatives": Negatives(log_q=np.full(batch_size, -np.log(num_items), np.float32))}


class Trainer:
    """A TwoTower state and its jitted step on one mesh; `step()` runs and times one step."""

    def __init__(self, tc: TrainConfig, num_items: int, devices: int, batch_size: int,
                 seed: int = 0):
        self.mesh = sharding.make_mesh(MeshConfig(data=devices, model=1),
                                       devices=jax.devices()[:devices])
        vocab = Vocabularies(num_users=USERS, num_items=num_items, num_genres=1)
        self.graphdef, self.state, shardings = state_lib.create(
            lambda rngs: TwoTower(MODEL, vocab, rngs), state_lib.make_optimizer(tc), 0, self.mesh)
        self.train_step = steps.make_train_step(self.graphdef, steps.retrieval_loss, tc,
                                                shardings, self.mesh)
        rng = np.random.default_rng(seed)
        self.batches = [make_batch(rng, batch_size, num_items) for _ in range(2)]
        self.count = 0

    def step(self) -> float:
        """Seconds for one step (the first call includes compilation)."""
        with jax.set_mesh(self.mesh):
            batch = sharding.shard_batch(self.batches[self.count % 2], self.mesh)
            t0 = time.perf_counter()
            self.state, loss = self.train_step(self.state, batch)
            loss.block_until_ready()
        self.count += 1
        return time.perf_counter() - t0

    def params(self) -> dict:
        leaves = jax.tree_util.tree_flatten_with_path(self.state[0])[0]
        return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves
                if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)}


def throughput(batch_size: int, num_items: int, timed_steps: int) -> dict:
    tc = TrainConfig(optimizer="adam", embedding_optimizer="rowwise_adagrad")
    out = {}
    for devices in (1, 2, 4, 8):
        trainer = Trainer(tc, num_items, devices, batch_size)
        trainer.step()
        seconds = statistics.median(trainer.step() for _ in range(timed_steps))
        out[str(devices)] = batch_size / seconds
        print(f"  {devices} devices: {out[str(devices)]:.0f} examples/s", flush=True)
    return out


def vocab_scaling(batch_size: int, rows: tuple[int, int], timed_steps: int,
                  devices: int) -> tuple[dict, dict]:
    """Median step seconds {kind: {rows: s}}, alternating small and large tables step by step
    (so load from other work hits both alike), and the large sparse state's table layout."""
    result, layout = {}, {}
    for kind, embedding_optimizer in (("sparse", "rowwise_adagrad"), ("dense", "dense")):
        tc = TrainConfig(optimizer="adam", embedding_optimizer=embedding_optimizer)
        trainers = {n: Trainer(tc, n, devices, batch_size) for n in rows}
        if kind == "sparse":
            layout = table_layout(trainers[rows[1]].state)
        for trainer in trainers.values():
            trainer.step()
        times = {n: [] for n in rows}
        for _ in range(timed_steps if kind == "sparse" else max(2, timed_steps // 2)):
            for n, trainer in trainers.items():
                times[n].append(trainer.step())
        result[kind] = {str(n): statistics.median(t) for n, t in times.items()}
        print(f"  {devices} devices, {kind}: {result[kind]}", flush=True)
        del trainers
    return result, layout


def table_layout(state) -> dict:
    table = state[0]["item_table"]["embedding"][...]
    shard = table.addressable_shards[0].data
    return {"table_shape": list(table.shape), "num_row_shards": table.shape[0] // shard.shape[0],
            "table_bytes": table.nbytes, "table_bytes_per_device": shard.nbytes,
            "table_bytes_per_device_ratio": shard.nbytes / table.nbytes}


def single_device_difference(embedding_optimizer: str, num_steps: int = 3) -> float:
    """Max |parameter difference| after `num_steps` adagrad steps on 8 devices vs on 1."""
    tc = TrainConfig(optimizer="adagrad", learning_rate=0.1,
                     embedding_optimizer=embedding_optimizer)
    params = []
    for devices in (8, 1):
        trainer = Trainer(tc, 4096, devices, 512, seed=1)
        for _ in range(num_steps):
            trainer.step()
        params.append(trainer.params())
    return max(float(np.abs(params[0][k] - params[1][k]).max()) for k in params[0])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--small-rows", type=int, default=10_000)
    parser.add_argument("--large-rows", type=int, default=2_000_000)
    parser.add_argument("--throughput-rows", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    args = parser.parse_args(argv)
    t0 = time.time()
    print("examples/s (row-wise Adagrad tables, Adam dense layers):", flush=True)
    out = {"batch_size": args.batch_size, "history_len": HISTORY, "embed_dim": MODEL.embed_dim,
           "host_cpus": os.cpu_count(),
           "examples_per_sec": throughput(args.batch_size, args.throughput_rows, args.steps)}
    print("step seconds by item rows:", flush=True)
    small, large = str(args.small_rows), str(args.large_rows)
    for devices, suffix in ((8, ""), (1, "_1_device")):
        step_seconds, layout = vocab_scaling(args.batch_size, (args.small_rows, args.large_rows),
                                             args.steps, devices)
        out.update({f"step_seconds{suffix}": step_seconds,
                    f"step_time_ratio_large_vs_small_vocab{suffix}":
                        step_seconds["sparse"][large] / step_seconds["sparse"][small],
                    f"step_time_ratio_large_vs_small_vocab_dense{suffix}":
                        step_seconds["dense"][large] / step_seconds["dense"][small]})
        if devices == 8:
            out.update(layout)
    out["max_abs_diff_vs_single_device"] = single_device_difference("dense")
    out["max_abs_diff_vs_single_device_sparse"] = single_device_difference("rowwise_adagrad")
    out["wall_seconds"] = time.time() - t0
    out["provenance"] = provenance.record()
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
