"""Training input from prepared data: what the reading (and training) process's memory grows with.

    python -m benchmarks.input_memory --json docs/input_memory.json

For each size (synthetic data, about 1M and 10M events: the same 34,000 users and 50,000
items, 30 or 300 events per user, so only the events grow), `recsys prepare`s the training
examples with data.shuffle_window=`--window`, then reads `--steps` global batches through the
Grain reader in a fresh process and records that process's peak RSS. For comparison, the same
process kinds are measured doing nothing but importing (baseline) and building the examples
in memory (Dataset + BatchOrder, what training does without data.prepared).

Writes JSON with, per size (`sizes`: list):
  events, examples, users, items     the prepared data
  prepare_seconds, prepare_peak_rss_mib, disk_mib, shards
  peak_rss_mib                       the Grain reader's process after `steps` batches
  open_shards_max                    the most shard readers it held open at once
  read_examples_per_sec              examples read (decoded, batched) per second, prefetch 2,
                                     shards in the page cache (just written)
  read_examples_per_sec_cold         the same with the shards dropped from the page cache
  in_memory_peak_rss_mib             building the Dataset and BatchOrder instead
  train_peak_rss_mib, train_examples_per_sec
                                     a `recsys train` process (default towers, no ranker,
                                     validation or mining: the events are never loaded) reading
                                     the prepared examples, `--train-steps` steps
  train_in_memory_peak_rss_mib, train_in_memory_examples_per_sec
                                     the same training from the events in memory
and once: window, baseline_rss_mib (imports only), batch_order_at_us ({batch: us} of
BatchOrder.at over 10M examples, default data.shuffle_window), example_indices_us ({batch: us}
of `example_indices` over 10M examples at the default window, what the Grain reader computes
per batch), grain_index_shuffle_us (one grain.experimental.index_shuffle call), the
reading settings and provenance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = {"100k": 3.0, "1M": 30.0, "10M": 300.0}  # mean events per user
USERS, ITEMS = 34_000, 50_000
WINDOW = 1 << 18  # 262,144 examples: 1M events are 4 windows, 10M are 38


def data_config(per_user: float, window: int):
    from recsys.config import DataConfig
    return DataConfig(num_users=USERS, num_items=ITEMS, interactions_per_user=per_user,
                      num_clusters=64, num_genres=12, history_len=20, shuffle_window=window)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---- the child processes (each measures its own peak RSS) ------------------------------------


def child_baseline() -> dict:
    import grain  # noqa: F401
    import tensorflow_datasets  # noqa: F401

    from recsys.data import grain_input  # noqa: F401
    return {"peak_rss_mib": peak_rss_mib()}


def child_prepare(per_user: float, window: int, out: str) -> dict:
    from recsys.data import prepare
    t0 = time.perf_counter()
    prepare.prepare(data_config(per_user, window), out)
    return {"prepare_seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}


def child_read(out: str, steps: int, batch: int, prefetch: int, cold: bool) -> dict:
    from recsys.data.grain_input import PreparedData
    if cold:  # drop the shards from the page cache: every record comes from the disk
        for path in pathlib.Path(out).rglob("*.array_record*"):
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    data = PreparedData.open(out)
    rows, most = 0, 0
    with data.batches(batch, seed=0, prefetch=prefetch, num_steps=steps + 1) as reader:
        next(reader)  # opens the first shards' readers
        t0 = time.perf_counter()
        for _ in range(steps):
            rows += len(next(reader).positions)
            most = max(most, len(data._shards.open_shards))
        seconds = time.perf_counter() - t0
    return {"read_examples_per_sec": rows / seconds, "peak_rss_mib": peak_rss_mib(),
            "open_shards_max": most}


def child_in_memory(per_user: float, window: int, steps: int, batch: int) -> dict:
    child_baseline()  # the same imports as the reader's process
    from recsys.data import dataset
    from recsys.data.batches import BatchOrder, example_inputs
    from recsys.data.sources import load_raw
    cfg = data_config(per_user, window)
    ds = dataset.build(load_raw(cfg), cfg)
    order = BatchOrder(ds.train_positions(cfg.trained_on, cfg.max_examples_per_user), batch, 0,
                       window)
    t0 = time.perf_counter()
    for step in range(steps):
        example_inputs(ds, order.at(step))
    return {"read_examples_per_sec": steps * batch / (time.perf_counter() - t0),
            "peak_rss_mib": peak_rss_mib()}


def child_train(per_user: float, window: int, out: str, steps: int, batch: int,
                prepared: bool) -> dict:
    """`recsys train` of the default towers for `steps` steps (no ranker, validation or
    mining): from the prepared examples (the events never loaded) or from the events."""
    import tempfile

    from recsys import pipeline
    from recsys.config import Config, RankerConfig, TrainConfig
    data = data_config(per_user, window)
    if prepared:
        data = dataclasses.replace(data, prepared=out)
    cfg = Config(data=data, ranker=RankerConfig(steps=0),
                 train=TrainConfig(batch_size=batch, num_steps=steps, log_every=steps))
    with tempfile.TemporaryDirectory() as workdir:
        metrics = pipeline.train(cfg, pathlib.Path(workdir))
    return {"examples_per_sec": metrics["train/examples_per_sec"],
            "peak_rss_mib": peak_rss_mib()}


def child_order_cost() -> dict:
    import grain
    import numpy as np

    from recsys.config import DataConfig
    from recsys.data.batches import BatchOrder, example_indices
    n, window = 10_000_000, DataConfig().shuffle_window
    out, direct = {}, {}
    for batch in (1024, 8192):
        order = BatchOrder(np.arange(n), batch, 0, window)
        order.at(0)
        t0 = time.perf_counter()
        for step in range(200):
            order.at(step)
        out[str(batch)] = (time.perf_counter() - t0) / 200 * 1e6
        rows = np.arange(batch)
        t0 = time.perf_counter()
        for step in range(200):
            example_indices(step, rows, batch, n, 0, window)
        direct[str(batch)] = (time.perf_counter() - t0) / 200 * 1e6
    t0 = time.perf_counter()
    for i in range(8192):
        grain.experimental.index_shuffle(i, n - 1, 0, 4)
    return {"batch_order_at_us": out, "example_indices_us": direct,
            "grain_index_shuffle_us": (time.perf_counter() - t0) / 8192 * 1e6}


CHILDREN = {"baseline": child_baseline, "prepare": child_prepare, "read": child_read,
            "in_memory": child_in_memory, "train": child_train, "order_cost": child_order_cost}


def run_child(name: str, **kwargs) -> dict:
    """Runs CHILDREN[name](**kwargs) in a fresh interpreter; returns its JSON."""
    code = (f"import json, sys; from benchmarks.input_memory import CHILDREN; "
            f"print(json.dumps(CHILDREN[{name!r}](**json.loads(sys.argv[1]))))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], cwd=ROOT,
                            capture_output=True, text=True, check=False,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"{name} {kwargs} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(ROOT / "runs" / "input_memory"),
                   help="where the prepared directories go (removed at the end)")
    p.add_argument("--sizes", default="1M,10M", help=f"comma-separated, of {list(SIZES)}")
    p.add_argument("--window", type=int, default=WINDOW, help="data.shuffle_window")
    p.add_argument("--steps", type=int, default=1200,
                   help="global batches read per size (default: ~5 windows)")
    p.add_argument("--batch", type=int, default=1024, help="global batch size")
    p.add_argument("--prefetch", type=int, default=2, help="batches read ahead")
    p.add_argument("--train-steps", type=int, default=600,
                   help="steps of each `recsys train` measured per size")
    p.add_argument("--keep", action="store_true", help="keep the prepared directories")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    from benchmarks import provenance

    workdir = pathlib.Path(args.workdir)
    result = {"baseline_rss_mib": run_child("baseline")["peak_rss_mib"],
              **run_child("order_cost"), "window": args.window, "steps": args.steps,
              "batch": args.batch,
              "prefetch": args.prefetch, "sizes": []}
    for label in args.sizes.split(","):
        data = {"per_user": SIZES[label], "window": args.window}
        out = workdir / label
        prep = run_child("prepare", **data, out=str(out))
        spec = json.loads((out / "spec.json").read_text())
        read = run_child("read", out=str(out), steps=args.steps, batch=args.batch,
                         prefetch=args.prefetch, cold=False)
        cold = run_child("read", out=str(out), steps=args.steps, batch=args.batch,
                         prefetch=args.prefetch, cold=True)
        mem = run_child("in_memory", **data, steps=args.steps, batch=args.batch)
        train = {kind: run_child("train", **data, out=str(out), steps=args.train_steps,
                                 batch=args.batch, prepared=kind == "prepared")
                 for kind in ("prepared", "in_memory")}
        disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        result["sizes"].append({
            "label": label, "events": spec["num_events"], "examples": spec["num_examples"],
            "users": spec["num_users"], "items": spec["num_items"],
            "prepare_seconds": prep["prepare_seconds"],
            "prepare_peak_rss_mib": prep["peak_rss_mib"], "disk_mib": disk / 2**20,
            "shards": len(spec["tfds"]["shard_lengths"]),
            "peak_rss_mib": read["peak_rss_mib"], "open_shards_max": read["open_shards_max"],
            "read_examples_per_sec": read["read_examples_per_sec"],
            "read_examples_per_sec_cold": cold["read_examples_per_sec"],
            "in_memory_peak_rss_mib": mem["peak_rss_mib"],
            "in_memory_examples_per_sec": mem["read_examples_per_sec"],
            "train_peak_rss_mib": train["prepared"]["peak_rss_mib"],
            "train_examples_per_sec": train["prepared"]["examples_per_sec"],
            "train_in_memory_peak_rss_mib": train["in_memory"]["peak_rss_mib"],
            "train_in_memory_examples_per_sec": train["in_memory"]["examples_per_sec"]})
        print(json.dumps(result["sizes"][-1]), file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(out)
    result["provenance"] = provenance.record()
    provenance.emit(result, args.json)


if __name__ == "__main__":
    main()
