"""An index tuned to a recall target: the fastest query-time setting that meets it on real queries.

ScaNN's tree + asymmetric hashing trades recall for speed through two query-time knobs:
the leaves searched per query and the hashed candidates re-scored exactly (reorder). Formulas
derived from the catalogue size miss in both directions (recall .80 at 1M with 48 leaves on
one catalogue, .976 at half the attainable speed on another), so `tune` measures instead:
  1. exact top-k of a sample of real query vectors (the query tower's outputs) is the truth;
  2. for each reorder depth, the fewest leaves whose recall@k on a tuning half of the sample
     meets the target with confidence: its mean less two standard errors (over the half's
     queries) is at least the target, so the held-out figure lands on the target rather than
     below it half the time; recall grows with leaves, so a bisection finds it;
  3. each of those settings is timed, and the fastest wins; its recall is then measured on the
     other, held-out half, and that is the figure reported;
  4. when no setting reaches the target, the tree is rebuilt once with twice the k-means
     training sample, and failing that the index falls back to exact (brute-force) search
     (as it does at once for a target of 1: only exact search promises it on unseen queries).
Speed is queries per CPU-second (process time), robust on a shared machine.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from recsys.index.params import ScannParams
from recsys.index.recall import recall_at_k, recall_per_query
from recsys.index.searcher import ExactSearcher, ScannSearcher, Searcher

REORDERS = (25, 50, 100, 200, 400, 1000, 2000, 4000)  # re-scored candidates tried (>= k each)
TIMING_REPEATS = 3  # best of: the machine is shared


@dataclasses.dataclass(frozen=True)
class Tuning:
    """What tuning chose and measured (JSON-able, for the manifest and metrics.json)."""

    target_recall: float  # the goal, recall@k against exact search
    k: int
    recall: float  # measured on the held-out half of the query sample at the chosen setting
    tuning_recall: float  # on the tuning half (what the choice was made on)
    queries: int  # held-out queries behind `recall`
    qps_per_cpu_s: float  # queries per CPU-second at the chosen setting (batched, one call)
    exact_qps_per_cpu_s: float  # the same for exact search, for scale
    fallback: bool  # True: no setting met the target, the index is exact search
    params: dict  # the chosen ScannParams (or {"mode": "exact"} on fallback)
    tried: list  # [{"leaves_to_search", "reorder", "recall", "qps_per_cpu_s"}] in search order

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tune(searcher: Searcher, items_VxD: np.ndarray, valid_V: np.ndarray, queries_QxD: np.ndarray,
         target: float, k: int = 10, seed: int = 0) -> tuple[Searcher, Tuning]:
    """The fastest setting of `searcher` that meets `target` recall@k on `queries_QxD`.

    Args:
      searcher: a ScaNN tree searcher over items_VxD's valid rows (others are returned as they
        are, with recall 1 when they are exact).
      items_VxD, valid_V: what it indexes, for exact search (a memory map is read in chunks,
        never copied whole: recsys.index.ExactSearcher).
      queries_QxD: real query vectors; half choose the setting, the other half measure it.
      target: recall@k to reach, in (0, 1].
    Returns:
      (the tuned searcher, or an exact one on fallback; what was measured).
    """
    if not 0 < target <= 1:
        raise ValueError(f"index.target_recall={target}: must be in (0, 1]")
    q_QxD = np.asarray(queries_QxD, np.float32)
    if len(q_QxD) < 2:
        raise ValueError(f"tuning needs at least 2 query vectors, got {len(q_QxD)}")
    order = np.random.default_rng(seed).permutation(len(q_QxD))
    tune_q, held_q = q_QxD[order[: len(order) // 2]], q_QxD[order[len(order) // 2:]]
    exact = ExactSearcher(items_VxD, valid_V)
    truth_tune, truth_held = exact.search(tune_q, k)[1], exact.search(held_q, k)[1]
    exact_qps = qps_per_cpu_s(exact, held_q, k)
    if getattr(searcher, "params", None) is None or searcher.params.mode != "tree_ah":
        recall = recall_at_k(searcher.search(held_q, k)[1], truth_held)
        return searcher, Tuning(target, k, recall, recall, len(held_q), qps_per_cpu_s(searcher, held_q, k),
                                exact_qps, False, _params_of(searcher), [])
    tried: list[dict] = []
    # Only exact search promises recall 1 on queries it has not seen: a target of 1 asks for it.
    for attempt in range(2 if target < 1 else 0):
        best = _fastest(searcher, tune_q, truth_tune, target, k, tried)
        if best is not None:
            tuned = searcher.with_query_params(best["leaves_to_search"], best["reorder"])
            recall = recall_at_k(tuned.search(held_q, k)[1], truth_held)
            return tuned, Tuning(target, k, recall, best["recall"], len(held_q),
                                 best["qps_per_cpu_s"], exact_qps, False, _params_of(tuned), tried)
        if attempt == 0 and isinstance(searcher, ScannSearcher):  # a better-trained tree, once
            p = searcher.params
            sample = min(len(exact.rows_M), 2 * p.training_sample_size)
            if sample == p.training_sample_size:
                break
            searcher = ScannSearcher(items_VxD, dataclasses.replace(p, training_sample_size=sample),
                                     valid_V)
    exact_scann = ScannSearcher(items_VxD, ScannParams(mode="brute_force"), valid_V)
    recall = recall_at_k(exact_scann.search(held_q, k)[1], truth_held)
    return exact_scann, Tuning(target, k, recall, recall, len(held_q), qps_per_cpu_s(exact_scann, held_q, k),
                               exact_qps, True, _params_of(exact_scann), tried)


def lower_bound(per_query: np.ndarray) -> float:
    """Mean recall less two standard errors over the queries (a one-sided ~97.5% bound)."""
    return float(np.mean(per_query) - 2.0 * np.std(per_query) / np.sqrt(len(per_query)))


def _fastest(searcher: ScannSearcher, q_QxD, truth_QxK, target: float, k: int,
             tried: list) -> dict | None:
    """For each reorder depth the fewest leaves meeting the target; the fastest of those."""
    num_leaves = searcher.params.num_leaves
    candidates = []
    for reorder in sorted({max(r, k) for r in REORDERS if r <= max(len(searcher.rows_M), k)}):
        def recall_at(leaves: int, reorder=reorder) -> float:
            """The lower confidence bound of recall at this setting (mean and bound recorded)."""
            s = searcher.with_query_params(leaves, reorder)
            per_query = recall_per_query(s.search(q_QxD, k)[1], truth_QxK)
            bound = lower_bound(per_query)
            tried.append({"leaves_to_search": leaves, "reorder": reorder,
                          "recall": float(np.mean(per_query)), "lower_bound": bound})
            return bound

        if recall_at(num_leaves) < target:
            continue  # this reorder depth cannot reach it at all
        lo, hi = 1, num_leaves  # recall_at(hi) meets the target
        while lo < hi:
            mid = (lo + hi) // 2
            if recall_at(mid) >= target:
                hi = mid
            else:
                lo = mid + 1
        best = next(t for t in reversed(tried)
                    if t["leaves_to_search"] == hi and t["reorder"] == reorder)
        best["qps_per_cpu_s"] = qps_per_cpu_s(searcher.with_query_params(hi, reorder), q_QxD, k)
        candidates.append(best)
    return max(candidates, key=lambda c: c["qps_per_cpu_s"]) if candidates else None


def qps_per_cpu_s(searcher: Searcher, q_QxD: np.ndarray, k: int) -> float:
    """Queries per CPU-second of one batched search (best of TIMING_REPEATS): robust on a
    shared machine; the measure of tuning, benchmarks.index and recsys report."""
    best = np.inf
    for _ in range(TIMING_REPEATS):
        t0 = time.process_time()
        searcher.search(q_QxD, k)
        best = min(best, time.process_time() - t0)
    return len(q_QxD) / max(best, 1e-9)


def _params_of(searcher: Searcher) -> dict:
    params = getattr(searcher, "params", None)
    return params.to_dict() if params is not None else {"mode": "exact"}
