"""The index tuned to a recall target vs hand-tuned ScaNN, FAISS, hnswlib and exact search.

    python -m benchmarks.index --json docs/index.json --png docs/img/index_tradeoff.png  # 1e6 x 64
    python -m benchmarks.index --json docs/index_10m.json --png docs/img/index_tradeoff_10m.png \\
        --num-items 10000000 --no-graphs                            # 1e7 (2.4 GiB of vectors)

On clustered synthetic item vectors with real-shaped queries (recsys.index.clustered_vectors),
written to a .npy in blocks by the export's writer and read back memory-mapped (as export
builds its index), one run measures, all on the same held-out queries:
  tuned       the default: parameters derived from N, then `recsys.index.tuning.tune` to
              index.target_recall on a separate tuning sample (what export does)
  hand-tuned  a grid over leaves searched x reorder on the same tree, plus a tree of sqrt(N)
              leaves; the fastest point whose held-out recall meets the target
  peers       FAISS IVF-PQ fast scan + exact refine, FAISS HNSW and hnswlib when installed
              (imported only here; when absent, skipped with one line in the JSON and on
              stderr): a small grid of each one's knobs, the fastest point meeting the target
  exact       numpy brute force (recsys.index.ExactSearcher) and the sharded JAX top-k over
              every local device (recsys.eval.ranking.sharded_topk)
Speeds are queries per CPU-second of one batched call on one thread (time.process_time, best of
3: `recsys.index.tuning.qps_per_cpu_s`): robust on a shared machine; the load average is
recorded. Builds use every core. A sweep of one knob (leaves, nprobe, ef) stops after its
first point under --min-qps queries per CPU-second. Like the hand-tuned grid, the peers' best
points are picked on the held-out queries themselves (an oracle the tuned default does not
get). Keys of the done-when: `tuned_recall@10`, `tuned_qps_per_cpu_s`,
`best_hand_tuned_qps_per_cpu_s`, `exact_qps_per_cpu_s`; each peer's figures are under `peers`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.metadata
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

from benchmarks import provenance
from recsys.config import IndexConfig
from recsys.export import WRITE_ROWS, write_vectors
from recsys.index import (
    ExactSearcher,
    ScannSearcher,
    build,
    clustered_vectors,
    load,
    recall_at_k,
    tuning,
)

LEAVES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
REORDERS = (50, 100, 200, 400)
# Peers' grids. IVF lists: sqrt(N) and 2 sqrt(N) (ScaNN's derived tree), trained on 200 rows a
# list as ScaNN's tree is; 4-bit PQ codes of 2 dims (ScaNN's dims_per_block) or 1; candidates
# re-scored exactly: k x k_factor = 50..1600 at k = 10 (ScaNN's tuning tries 25..4000).
# Graphs: M 8 and 16 at ef_construction 200, the same for both libraries, searched at every ef.
IVF_LISTS_PER_SQRT_N = (1.0, 2.0)
IVF_SAMPLES_PER_LIST = 200
IVF_DIMS_PER_CODE = (2, 1)
IVF_NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256)
IVF_K_FACTOR = (5, 10, 20, 40, 80, 160)
HNSW_M, HNSW_EF_CONSTRUCTION = (8, 16), 200
HNSW_EF = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
PEERS = ("faiss_ivfpq_fs", "faiss_hnsw", "hnswlib")


def latency_us(searcher, q_QxD: np.ndarray, k: int) -> dict:
    """p50 / p99 microseconds of single-query calls, one query at a time."""
    searcher.search(q_QxD[0], k)  # warm-up
    lat_Q = np.empty(len(q_QxD))
    for i, q_D in enumerate(q_QxD):
        start = time.perf_counter()
        searcher.search(q_D, k)
        lat_Q[i] = time.perf_counter() - start
    p50, p99 = np.percentile(lat_Q, [50, 99]) * 1e6
    return {"p50_us": round(float(p50), 1), "p99_us": round(float(p99), 1)}


def rss_anon_gib() -> float:
    """This process's anonymous resident memory (heap; not a memory map's page cache)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    return kib / 2**20


def best_point(curve: list[dict], target: float) -> dict | None:
    """The fastest point of a curve whose recall meets the target (None when none does)."""
    meeting = [p for p in curve if p["recall"] >= target]
    return max(meeting, key=lambda p: p["qps_per_cpu_s"]) if meeting else None


def _point(searcher, held_q, truth, k: int, **knobs) -> dict:
    return {**knobs, "recall": round(recall_at_k(searcher.search(held_q, k)[1], truth), 4),
            "qps_per_cpu_s": round(tuning.qps_per_cpu_s(searcher, held_q, k), 1)}


def _swept(grid: list[tuple], measure, min_qps: float) -> list[dict]:
    """measure(knobs) at each grid point; knobs[0] is swept upwards (each step slower) for each
    value of the others, and a sweep stops after its first point below min_qps (1e7 would
    spend hours on points far slower than any setting worth having)."""
    curve, stopped = [], set()
    for knobs in grid:
        if knobs[1:] not in stopped:
            curve.append(measure(knobs))
            if curve[-1]["qps_per_cpu_s"] < min_qps:
                stopped.add(knobs[1:])
    return curve


def _grid(searcher: ScannSearcher, held_q, truth, k: int, min_qps: float) -> list[dict]:
    leaves = searcher.params.num_leaves
    return _swept([(n, r) for r in REORDERS for n in LEAVES if n <= leaves],
                  lambda knobs: _point(searcher.with_query_params(*knobs), held_q, truth, k,
                                       num_leaves=leaves, leaves_to_search=knobs[0],
                                       reorder=knobs[1]), min_qps)


# The data and exact search ----------------------------------------------------------------------

def _data(args, directory: pathlib.Path):
    """Items [N, D] memory-mapped from a .npy written in export's blocks, valid [N], queries."""
    items_NxD, q_QxD = clustered_vectors(args.num_items, 2 * args.num_queries, args.dim,
                                         num_clusters=args.num_clusters, seed=args.seed)
    mapped_NxD = write_vectors(directory / "item_vectors.npy", items_NxD, WRITE_ROWS)
    del items_NxD
    gc.collect()
    valid_N = np.arange(args.num_items) > 0  # row 0 is the vocab's padding row
    return mapped_NxD, valid_N, q_QxD[:args.num_queries], q_QxD[args.num_queries:]


def _exact(args, items_NxD, valid_N, held_q, k: int) -> tuple[np.ndarray, dict]:
    exact = ExactSearcher(items_NxD, valid_N)
    truth = exact.search(held_q, k)[1]
    sub = held_q[:args.exact_queries]
    out = {"exact_qps_per_cpu_s": round(tuning.qps_per_cpu_s(exact, sub, k), 1)}
    if args.sharded_exact:
        import jax

        from recsys import sharding
        from recsys.config import MeshConfig
        from recsys.eval import ranking
        mesh = sharding.make_mesh(MeshConfig())
        ranking.sharded_topk(sub, items_NxD, k, mesh)  # compile
        t0 = time.process_time()
        rows = ranking.sharded_topk(sub, items_NxD, k, mesh)[1]
        out["sharded_jax_exact_qps_per_cpu_s"] = round(len(sub) / (time.process_time() - t0), 1)
        out["sharded_jax_exact_devices"] = len(jax.devices())
        out["sharded_jax_exact_agrees"] = bool(np.array_equal(rows, truth[:len(sub)]))
    return truth, out


# ScaNN: the tuned default and the hand-tuned grid -----------------------------------------------

def _scann(args, items_NxD, valid_N, tune_q, held_q, truth, k: int) -> dict:
    anon_before = rss_anon_gib()
    cpu, wall = time.process_time(), time.perf_counter()
    derived = build(items_NxD, IndexConfig(), valid_N)
    build_cpu, build_s = time.process_time() - cpu, time.perf_counter() - wall
    anon_built = rss_anon_gib()
    derived_recall = recall_at_k(derived.search(held_q, k)[1], truth)
    cpu = time.process_time()
    tuned, info = tuning.tune(derived, items_NxD, valid_N, tune_q, args.target_recall, k)
    tune_cpu = time.process_time() - cpu
    tuned_recall = recall_at_k(tuned.search(held_q, k)[1], truth)
    tuned_qps = tuning.qps_per_cpu_s(tuned, held_q, k)
    with tempfile.TemporaryDirectory() as tmp:
        tuned.save(pathlib.Path(tmp) / "index")
        index_bytes = sum(p.stat().st_size for p in pathlib.Path(tmp).rglob("*") if p.is_file())
        start = time.perf_counter()
        load(pathlib.Path(tmp) / "index")
        load_s = time.perf_counter() - start
    out = {
        "derived_params": dataclasses.asdict(derived.params),
        "derived_recall@10": round(derived_recall, 4),
        "derived_qps_per_cpu_s": round(tuning.qps_per_cpu_s(derived, held_q, k), 1),
        "tuned_params": info.params, "tuned_fallback": info.fallback,
        "tuned_recall@10": round(tuned_recall, 4),
        "tuned_qps_per_cpu_s": round(tuned_qps, 1),
        "tuned_latency": latency_us(tuned, held_q[:args.latency_queries], k),
        "build_cpu_s": round(build_cpu, 1), "build_s": round(build_s, 1),
        "tune_cpu_s": round(tune_cpu, 1), "index_bytes": index_bytes,
        "index_mib": round(index_bytes / 2**20, 1), "load_s": round(load_s, 2),
        # Built from the memory map, ScaNN holds its own float copy of the rows and its codes.
        "scann_build_rss_anon_gib": round(anon_built - anon_before, 2),
        "vectors_gib": round(items_NxD.nbytes / 2**30, 2),
    }
    del tuned
    grid = _grid(derived, held_q, truth, k, args.min_qps)
    leaves = round(math.sqrt(args.num_items))
    params = dataclasses.replace(
        derived.params, num_leaves=leaves,
        leaves_to_search=min(derived.params.leaves_to_search, leaves),
        training_sample_size=min(args.num_items - 1, 200 * leaves))
    del derived
    gc.collect()
    grid += _grid(ScannSearcher(items_NxD, params, valid_N), held_q, truth, k, args.min_qps)
    gc.collect()
    best = best_point(grid, args.target_recall)
    out.update({
        "hand_tuned_grid": grid, "best_hand_tuned": best,
        "best_hand_tuned_qps_per_cpu_s": best["qps_per_cpu_s"] if best else 0.0,
        "tuned_vs_best_hand_tuned": round(tuned_qps / best["qps_per_cpu_s"], 3) if best else None,
    })
    return out


# Peers: FAISS and hnswlib, imported only when asked for -----------------------------------------

class _Peer:
    """A peer's index over rows 1..N-1 behind the searchers' interface: search(q, k) ->
    (scores, rows), [Q, k] or [k] for one [D] query, row -1 where nothing was found."""

    def __init__(self, search_fn, row_offset: int):
        self._search, self._offset = search_fn, row_offset

    def search(self, queries: np.ndarray, k: int):
        q_QxD = np.ascontiguousarray(queries, np.float32)
        single = q_QxD.ndim == 1
        scores_QxK, ids_QxK = self._search(q_QxD[None] if single else q_QxD, k)
        ids_QxK = ids_QxK.astype(np.int64)
        rows_QxK = np.where(ids_QxK < 0, -1, ids_QxK + self._offset)
        return (scores_QxK[0], rows_QxK[0]) if single else (scores_QxK, rows_QxK)


def _faiss_ivfpq(faiss, items_NxD, held_q, truth, k, args) -> dict:
    """IVF-PQ fast scan (4-bit codes) + exact refine: lists x code width x probes x depth."""
    n, dim = items_NxD.shape
    most = IVF_SAMPLES_PER_LIST * round(max(IVF_LISTS_PER_SQRT_N) * math.sqrt(n))
    sample = np.random.default_rng(0).choice(np.arange(1, n), min(n - 1, most), replace=False)
    train_NxD = items_NxD[np.sort(sample)]
    builds, curve = [], []
    for per_sqrt in IVF_LISTS_PER_SQRT_N:
        for dims in IVF_DIMS_PER_CODE:
            lists = round(per_sqrt * math.sqrt(n))
            spec = f"IVF{lists},PQ{dim // dims}x4fs,RFlat"
            faiss.omp_set_num_threads(os.cpu_count() or 1)
            cpu, wall = time.process_time(), time.perf_counter()
            index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
            index.train(train_NxD[:IVF_SAMPLES_PER_LIST * lists])
            index.add(items_NxD[1:])
            built = _built(spec, cpu, wall, _faiss_bytes(faiss, index))
            faiss.omp_set_num_threads(1)

            def at(knobs: tuple[int, int], index=index) -> _Peer:
                ivf = faiss.SearchParametersIVF(nprobe=knobs[0])
                params = faiss.IndexRefineSearchParameters(k_factor=knobs[1],
                                                           base_index_params=ivf)
                # `ivf` stays referenced: `params` points at it.
                return _Peer(lambda q, kk, _ivf=ivf: index.search(q, kk, params=params), 1)

            grid = [(nprobe, k_factor) for k_factor in IVF_K_FACTOR
                    for nprobe in IVF_NPROBE if nprobe <= lists]
            curve += _sweep(at, grid, ("nprobe", "k_factor"), built, held_q, truth, k, args)
            builds.append(built)
            del index
            gc.collect()
    return _summary(curve, builds, args.target_recall)


def _faiss_hnsw(faiss, items_NxD, held_q, truth, k, args) -> dict:
    builds, curve = [], []
    for m in HNSW_M:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        cpu, wall = time.process_time(), time.perf_counter()
        index = faiss.IndexHNSWFlat(items_NxD.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(items_NxD[1:])
        built = _built(f"HNSW{m},Flat efConstruction {HNSW_EF_CONSTRUCTION}", cpu, wall,
                       _faiss_bytes(faiss, index))
        faiss.omp_set_num_threads(1)

        def at(ef: tuple[int], index=index) -> _Peer:
            params = faiss.SearchParametersHNSW(efSearch=ef[0])
            return _Peer(lambda q, kk: index.search(q, kk, params=params), 1)

        curve += _sweep(at, [(ef,) for ef in HNSW_EF], ("ef_search",), built, held_q, truth, k,
                        args)
        builds.append(built)
        del index
        gc.collect()
    return _summary(curve, builds, args.target_recall)


def _hnswlib(hnswlib, items_NxD, held_q, truth, k, args) -> dict:
    n, dim = items_NxD.shape
    builds, curve = [], []
    for m in HNSW_M:
        cpu, wall = time.process_time(), time.perf_counter()
        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(max_elements=n - 1, ef_construction=HNSW_EF_CONSTRUCTION, M=m)
        index.add_items(items_NxD[1:], np.arange(1, n), num_threads=os.cpu_count() or 1)
        built = _built(f"M {m}, ef_construction {HNSW_EF_CONSTRUCTION}", cpu, wall,
                       int(index.index_file_size()))
        index.set_num_threads(1)

        def at(ef: tuple[int], index=index) -> _Peer:
            def search(q_QxD, kk):
                index.set_ef(ef[0])
                labels_QxK, distances_QxK = index.knn_query(q_QxD, k=kk, num_threads=1)
                return 1.0 - distances_QxK, labels_QxK  # space "ip": 1 - inner product
            return _Peer(search, 0)  # the labels are the rows themselves

        curve += _sweep(at, [(ef,) for ef in HNSW_EF], ("ef",), built, held_q, truth, k, args)
        builds.append(built)
        del index
        gc.collect()
    return _summary(curve, builds, args.target_recall)


def _built(spec: str, cpu: float, wall: float, index_bytes: int) -> dict:
    return {"spec": spec, "build_s": round(time.perf_counter() - wall, 1),
            "build_cpu_s": round(time.process_time() - cpu, 1), "index_bytes": index_bytes}


def _sweep(at, grid: list[tuple], names: tuple[str, ...], built: dict, held_q, truth, k,
           args) -> list[dict]:
    """One build searched at every grid point; its best point's single-query latency is timed."""
    curve = _swept(grid, lambda knobs: _point(at(knobs), held_q, truth, k, spec=built["spec"],
                                              **dict(zip(names, knobs))), args.min_qps)
    best = best_point(curve, args.target_recall)
    if best is not None:
        built["latency"] = latency_us(at(tuple(best[n] for n in names)),
                                      held_q[:args.latency_queries], k)
    return curve


def _faiss_bytes(faiss, index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, os.path.join(tmp, "index"))
        return os.path.getsize(os.path.join(tmp, "index"))


def _summary(curve: list[dict], builds: list[dict], target: float) -> dict:
    """A peer's curve and builds, and its fastest point meeting the target with that build's
    seconds, bytes and single-query latency."""
    best = best_point(curve, target)
    out = {"builds": builds, "curve": curve, "best": best,
           "best_qps_per_cpu_s": best["qps_per_cpu_s"] if best else 0.0}
    if best is not None:
        b = next(b for b in builds if b["spec"] == best["spec"])
        out.update({"build_s": b["build_s"], "build_cpu_s": b["build_cpu_s"],
                    "index_bytes": b["index_bytes"], "latency": b.get("latency")})
    return out


def _peers(args, items_NxD, held_q, truth, k: int) -> tuple[dict, dict]:
    """Each peer's results, or {"skipped": why} (also printed on stderr); and their versions."""
    runs = {"faiss_ivfpq_fs": ("faiss", _faiss_ivfpq), "faiss_hnsw": ("faiss", _faiss_hnsw),
            "hnswlib": ("hnswlib", _hnswlib)}
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin
    out, versions = {}, {}
    for name in PEERS:
        module_name, fn = runs[name]
        why = None
        if not args.graphs and name != "faiss_ivfpq_fs":
            why = (f"not built (--no-graphs): graph builds grow as N log N, minutes each at "
                   f"1e6 on this machine, so the {2 * len(HNSW_M)} graphs of {args.num_items:,} "
                   f"rows would take hours on {os.cpu_count()} cores")
        else:
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                why = f"{module_name} is not installed ({e})"
        if why is not None:
            print(f"benchmarks.index: {name} skipped: {why}", file=sys.stderr)
            out[name] = {"skipped": why}
            continue
        versions[module_name] = importlib.metadata.version(
            "faiss-cpu" if module_name == "faiss" else module_name)
        out[name] = fn(module, items_NxD, held_q, truth, k, args)
        gc.collect()
    return out, versions


# The run, the picture and the command line ------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()
    k = args.k
    out = {"num_items": args.num_items, "dim": args.dim, "k": k,
           "target_recall": args.target_recall, "held_out_queries": args.num_queries}
    with tempfile.TemporaryDirectory() as tmp:
        items_NxD, valid_N, tune_q, held_q = _data(args, pathlib.Path(tmp))
        truth, exact = _exact(args, items_NxD, valid_N, held_q, k)
        out.update(exact)
        out.update(_scann(args, items_NxD, valid_N, tune_q, held_q, truth, k))
        out["tuned_vs_exact"] = round(out["tuned_qps_per_cpu_s"] / out["exact_qps_per_cpu_s"], 1)
        out["peers"], versions = _peers(args, items_NxD, held_q, truth, k)
        del items_NxD
    out.update({
        "machine": {"cpu_count": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "versions": {"scann": importlib.metadata.version("scann"), "numpy": np.__version__,
                     **versions},
        "provenance": provenance.record(),
    })
    return out


def frontier(curve: list[dict]) -> list[dict]:
    """The points no other point beats on both recall and speed, fastest first."""
    front, best_recall = [], -1.0
    for p in sorted(curve, key=lambda p: (-p["qps_per_cpu_s"], -p["recall"])):
        if p["recall"] > best_recall:
            front.append(p)
            best_recall = p["recall"]
    return front


LABELS = {"faiss_ivfpq_fs": "FAISS IVF-PQ fast scan + refine", "faiss_hnsw": "FAISS HNSW",
          "hnswlib": "hnswlib HNSW"}


def plot(result: dict, path: pathlib.Path) -> None:
    """Recall@k against queries per CPU-second (log x): each method's frontier, the tuned
    default, exact search and the target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"ScaNN tree-AH (hand grid)": result["hand_tuned_grid"]}
    series.update({LABELS[n]: r["curve"] for n, r in result["peers"].items() if "curve" in r})
    fig, ax = plt.subplots(figsize=(8, 5))
    lowest = 1.0
    for label, curve in series.items():
        front = frontier(curve)
        ax.plot([p["qps_per_cpu_s"] for p in front], [p["recall"] for p in front], marker="o",
                markersize=3, label=label)
        lowest = min(lowest, *(p["recall"] for p in front))
    ax.plot([result["tuned_qps_per_cpu_s"]], [result["tuned_recall@10"]], "k*", markersize=14,
            label=f"ScaNN tuned to {result['target_recall']} (the default)")
    ax.axvline(result["exact_qps_per_cpu_s"], color="grey", linestyle=":",
               label="exact search (numpy)")
    ax.axhline(result["target_recall"], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_ylim(max(lowest - 0.01, 0.8), 1.001)  # the region around the target
    ax.set_xlabel("queries per CPU-second (one thread, batched)")
    ax.set_ylabel(f"recall@{result['k']}")
    ax.set_title(f"{result['num_items']:,} items x {result['dim']}, "
                 f"{result['held_out_queries']:,} held-out queries")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="output file for the results")
    parser.add_argument("--png", type=pathlib.Path,
                        help="also draw recall against queries per CPU-second here")
    parser.add_argument("--num-items", type=int, default=1_000_000, help="N, catalogue rows")
    parser.add_argument("--dim", type=int, default=64, help="D, vector width")
    parser.add_argument("--num-queries", type=int, default=2000,
                        help="queries for tuning, and as many held out for every figure")
    parser.add_argument("--exact-queries", type=int, default=500,
                        help="held-out queries timed for exact search (slow at 1e7)")
    parser.add_argument("--num-clusters", type=int, default=1000, help="Zipf-sized clusters")
    parser.add_argument("--k", type=int, default=10, help="top-k for recall and timing")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--latency-queries", type=int, default=1000,
                        help="single-query calls timed for p50/p99")
    parser.add_argument("--sharded-exact", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the sharded JAX exact top-k over the local devices")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="build the HNSW peers (FAISS HNSW, hnswlib): hours at 1e7")
    parser.add_argument("--min-qps", type=float, default=1000.0,
                        help="a sweep of one knob stops after its first point slower than this "
                             "(queries per CPU-second)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (ScaNN is not seedable)")
    args = parser.parse_args(argv)
    result = run(args)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.png:
        plot(result, args.png)
    short = {k: v for k, v in result.items() if k not in ("hand_tuned_grid", "peers")}
    short["peers"] = {n: {k: v for k, v in r.items() if k not in ("curve", "builds")}
                      for n, r in result["peers"].items()}
    print(json.dumps(short, indent=2))


if __name__ == "__main__":
    main()
