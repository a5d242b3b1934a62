"""ScaNN (derived params) vs exact numpy search on clustered synthetic vectors: recall, speed, build.

    python -m benchmarks.index --json /tmp/index.json --num-items 1000000 --dim 64

Speeds are queries per CPU-second (time.process_time; robust on a shared machine); the load
average is recorded beside them. Latency is wall time of single-query `search` calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import tempfile
import time

import numpy as np

from recsys.config import IndexConfig
from recsys.index import ExactSearcher, build, clustered_vectors, load, recall_at_k


def _timed_search(searcher, q_QxD: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """Returns rows [Q, k], CPU seconds and wall seconds of one batched search."""
    cpu, wall = time.process_time(), time.perf_counter()
    _, rows_QxK = searcher.search(q_QxD, k)
    return rows_QxK, time.process_time() - cpu, time.perf_counter() - wall


def _latency_us(searcher, q_QxD: np.ndarray, k: int) -> dict:
    searcher.search(q_QxD[0], k)  # warm-up
    lat_Q = np.empty(len(q_QxD))
    for i, q_D in enumerate(q_QxD):
        start = time.perf_counter()
        searcher.search(q_D, k)
        lat_Q[i] = time.perf_counter() - start
    p50, p99 = np.percentile(lat_Q, [50, 99]) * 1e6
    return {"p50_us": round(float(p50), 1), "p99_us": round(float(p99), 1),
            "latency_queries": len(q_QxD)}


def _dir_mib(directory: pathlib.Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2**20


def run(args: argparse.Namespace) -> dict:
    """Builds both searchers on the same data and returns the measurements."""
    load_before = os.getloadavg()
    items_NxD, q_QxD = clustered_vectors(args.num_items, args.num_queries, args.dim,
                                         num_clusters=args.num_clusters, seed=args.seed)
    valid_N = np.arange(args.num_items) > 0  # row 0 is the vocab's padding row

    # Exact numpy baseline: also the ground truth.
    exact = ExactSearcher(items_NxD, valid_N)
    exact_QxK, exact_cpu, exact_wall = _timed_search(exact, q_QxD, args.k)
    exact_result = {"queries_per_cpu_s": round(len(q_QxD) / exact_cpu, 1),
                    "wall_s": round(exact_wall, 2),
                    **_latency_us(exact, q_QxD[:args.exact_latency_queries], args.k)}

    # ScaNN with parameters derived from N and D (plus any overrides).
    cfg = IndexConfig(kind="scann", num_leaves=args.num_leaves,
                      leaves_to_search=args.leaves_to_search, reorder=args.reorder)
    cpu, wall = time.process_time(), time.perf_counter()
    searcher = build(items_NxD, cfg, valid_N)
    build_cpu, build_wall = time.process_time() - cpu, time.perf_counter() - wall
    searcher.search(q_QxD[:10], args.k)  # warm-up
    approx_QxK, scann_cpu, scann_wall = _timed_search(searcher, q_QxD, args.k)
    with tempfile.TemporaryDirectory() as tmp:
        searcher.save(pathlib.Path(tmp) / "index")
        start = time.perf_counter()
        load(pathlib.Path(tmp) / "index")
        load_s = time.perf_counter() - start
        index_mib = _dir_mib(pathlib.Path(tmp) / "index")
    scann_result = {
        "params": dataclasses.asdict(searcher.params),
        f"recall_at_{args.k}": round(recall_at_k(approx_QxK, exact_QxK), 4),
        "queries_per_cpu_s": round(len(q_QxD) / scann_cpu, 1),
        "batched_wall_s": round(scann_wall, 3),
        **_latency_us(searcher, q_QxD[:args.latency_queries], args.k),
        "build_wall_s": round(build_wall, 2),
        "build_cpu_s": round(build_cpu, 2),
        "index_mib": round(index_mib, 1),
        "load_s": round(load_s, 3),
    }
    return {
        "num_items": args.num_items, "dim": args.dim, "num_queries": args.num_queries,
        "num_clusters": args.num_clusters, "k": args.k, "seed": args.seed,
        "scann": scann_result,
        "exact_numpy": exact_result,
        "speedup_per_cpu_s": round(scann_result["queries_per_cpu_s"]
                                   / exact_result["queries_per_cpu_s"], 1),
        "machine": {"cpu_count": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "versions": {"scann": importlib.metadata.version("scann"), "numpy": np.__version__},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="output file for the results")
    parser.add_argument("--num-items", type=int, default=1_000_000, help="N, catalogue rows")
    parser.add_argument("--dim", type=int, default=64, help="D, vector width")
    parser.add_argument("--num-queries", type=int, default=2000,
                        help="held-out queries (exact ground truth costs ~20 ms each at 1M)")
    parser.add_argument("--num-clusters", type=int, default=1000, help="Zipf-sized clusters")
    parser.add_argument("--k", type=int, default=10, help="top-k for recall and timing")
    parser.add_argument("--latency-queries", type=int, default=1000,
                        help="single-query ScaNN calls timed for p50/p99")
    parser.add_argument("--exact-latency-queries", type=int, default=50,
                        help="single-query exact calls timed for p50/p99")
    parser.add_argument("--num-leaves", type=int, default=0, help="override (0 = derived)")
    parser.add_argument("--leaves-to-search", type=int, default=0, help="override (0 = derived)")
    parser.add_argument("--reorder", type=int, default=0, help="override (0 = derived)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (ScaNN is not seedable)")
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    pathlib.Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
