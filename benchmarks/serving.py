"""Serving latency per stage and batched throughput of `Recommender`, with a compilation count.

    python -m benchmarks.serving --artifacts runs/pipeline/seed0/artifacts \
        --synthetic-items 1000000 --scale-artifacts runs/synthetic_10m/artifacts \
        --requests 1000 --json docs/serving.json

For each artifacts directory (a real one, and a synthetic catalogue built here with a short
pipeline run, where ScaNN is really approximate): load + warm-up time; then single requests of
random known users, one at a time, with p50/p99 wall milliseconds per stage and in total; the
same for the query tower + index search alone (the baseline, measured in the same run); and
batched requests per second. Every JAX compilation during the measured requests is counted (it
must be 0). The index's recall@10 is measured on the very queries the requests make (the known
users' query vectors, against exact search), so each latency stands beside the recall it was
served at. `--scale-artifacts` directories (the 1e7-item run of configs/synthetic_10m.py) are
measured last, alone in memory, and reported under "at_scale". The load average is recorded
beside the figures (the machine may be shared), with the commit and the recsys source hash;
docs/serving.json is the input of the serving table in docs/results.md (python -m
benchmarks.report).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import pathlib
import time

import jax
import numpy as np

from benchmarks import provenance
from recsys import features
from recsys import index as index_lib
from recsys.artifacts import published
from recsys.serve import Recommender
from recsys.serve.recommender import STAGES

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _percentiles(values_ms: list[float]) -> dict:
    p50, p99 = np.percentile(np.asarray(values_ms), [50, 99])
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}


def request_recall(rec: Recommender, users: list, k: int = 10) -> dict:
    """Recall@k of the served index against exact search on the query vectors of `users`."""
    q_QxD = rec.user_query_vectors(list(dict.fromkeys(users)))
    items = rec.artifacts.item_vectors
    exact = index_lib.ExactSearcher(items, features.valid_rows(len(items)))
    recall = index_lib.recall_at_k(rec.artifacts.searcher.search(q_QxD, k)[1],
                                   exact.search(q_QxD, k)[1])
    return {f"index_recall@{k}_on_requests": round(recall, 4), "recall_queries": len(q_QxD)}


def measure(artifacts: pathlib.Path, num_requests: int, seed: int = 0) -> dict:
    """Latency and throughput of one artifacts directory (see the module docstring)."""
    t0 = time.perf_counter()
    rec = Recommender.load(artifacts)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    users = rec.artifacts.users.ids[rng.integers(0, len(rec.artifacts.users.ids), num_requests)].tolist()
    recall = request_recall(rec, users)
    for u in users[:50]:  # warm caches (numpy, ScaNN); compiles happened in load
        rec.recommend(user_id=u, k=10)
    compiles = []

    def listener(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        stages = {s: [] for s in (*STAGES, "total", "wall")}
        for u in users:
            start = time.perf_counter()
            out = rec.recommend(user_id=u, k=10)
            stages["wall"].append((time.perf_counter() - start) * 1e3)
            for s in (*STAGES, "total"):
                stages[s].append(out.timings[s])
        baseline = []
        for u in users:
            start = time.perf_counter()
            a, length = rec.artifacts, rec.retriever.history_len
            row = a.users.lookup([u])
            hist = a.history_items[a.history_offsets[row[0]]:a.history_offsets[row[0] + 1]]
            h = np.zeros((1, length), np.int32)
            tail = hist[-length:]
            h[0, length - len(tail):] = tail
            a.searcher.search(rec.retriever.query_vectors(h, row.astype(np.int32)),
                              rec.num_candidates)
            baseline.append((time.perf_counter() - start) * 1e3)
        batched = {}
        for b in (64, 256):
            reqs = [{"user_id": u, "k": 10} for u in (users * (1 + 2 * b // len(users)))[:2 * b]]
            rec.recommend_batch(reqs[:b])
            start = time.perf_counter()
            rec.recommend_batch(reqs)
            batched[f"batch_{b}_requests_per_s"] = round(len(reqs) / (time.perf_counter() - start), 1)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    single = {s: _percentiles(v) for s, v in stages.items()}
    base = _percentiles(baseline)
    return {"num_items": int(rec.artifacts.manifest["num_items"]), "index": rec.artifacts.manifest.get("index"),
            "has_ranker": rec.artifacts.ranker_fn is not None,
            "num_candidates": rec.num_candidates, "load_and_warmup_s": round(load_s, 2),
            "single_request": single, "baseline_query_tower_plus_index": base,
            "total_over_baseline_p50": round(single["total"]["p50_ms"] / base["p50_ms"], 2),
            **batched, "compilations_during_measurement": len(compiles),
            "requests": num_requests, **recall}


def synthetic_artifacts(num_items: int, workdir: pathlib.Path) -> pathlib.Path:
    """A short pipeline run on a synthetic catalogue of num_items (reused when present)."""
    from recsys import config as config_lib
    from recsys import pipeline
    out = workdir / "artifacts"
    if published(out) is not None:
        return out
    cfg = config_lib.load(pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.py")
    cfg = dataclasses.replace(
        cfg, name=f"serving-bench-{num_items}",
        data=dataclasses.replace(cfg.data, num_users=2000, num_items=num_items),
        train=dataclasses.replace(cfg.train, num_steps=100, eval_every=0),
        ranker=dataclasses.replace(cfg.ranker, steps=20, batch_size=64, events="training"),
        eval=dataclasses.replace(cfg.eval, max_users=500))
    pipeline.run(cfg, workdir)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", action="append", default=[], help="artifacts dir (repeatable)")
    p.add_argument("--synthetic-items", type=int, default=0,
                   help="also build and measure a synthetic catalogue of this many items")
    p.add_argument("--scale-artifacts", action="append", default=[],
                   help="a large catalogue's artifacts dir, measured last (repeatable)")
    p.add_argument("--workdir", default="runs/serving-bench", help="where synthetic runs go")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args()
    dirs = {str(a): pathlib.Path(a) for a in args.artifacts}
    if args.synthetic_items:
        work = pathlib.Path(args.workdir) / f"synthetic-{args.synthetic_items}"
        dirs[f"synthetic-{args.synthetic_items}"] = synthetic_artifacts(args.synthetic_items, work)
    result = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count(),
              "jax": jax.__version__,
              "runs": {name: measure(d, args.requests) for name, d in dirs.items()}}
    # One at a time after the others: a 1e7-item bundle alone needs several GiB.
    result["at_scale"] = {}
    for d in args.scale_artifacts:
        gc.collect()  # the previous Recommender's arrays go before the next one loads
        result["at_scale"][d] = measure(pathlib.Path(d), args.requests)
    result.update(load_average_after=os.getloadavg(), provenance=provenance.record())
    provenance.emit(result, args.json)


if __name__ == "__main__":
    main()
