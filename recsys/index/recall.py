"""Recall of an approximate searcher against exact top-k, and the synthetic vectors it is measured on."""

from __future__ import annotations

import numpy as np

_RECALL_BLOCK = 256  # queries compared at once (memory ~ block x k x k booleans)


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Fraction of the exact top-k rows found in the approximate top-k, averaged over queries.

    Args:
      approx_rows: [Q, k] int rows from the searcher under test (-1 = no result).
      exact_rows: [Q, k] int rows from exact search; -1 padding (k above the catalogue) is not
        counted, and queries with no exact rows at all are skipped.

    Returns:
      Mean recall in [0, 1].
    """
    return float(np.mean(recall_per_query(approx_rows, exact_rows)))


def recall_per_query(approx_rows: np.ndarray, exact_rows: np.ndarray) -> np.ndarray:
    """[Q'] recall of each query that has exact rows (see `recall_at_k` for the arguments)."""
    approx_QxK = np.atleast_2d(np.asarray(approx_rows))
    exact_QxK = np.atleast_2d(np.asarray(exact_rows))
    if approx_QxK.shape != exact_QxK.shape:
        raise ValueError(f"approx_rows {approx_QxK.shape} and exact_rows {exact_QxK.shape} "
                         "must have the same [Q, k] shape")
    hits_Q, wanted_Q = [], []
    for start in range(0, len(exact_QxK), _RECALL_BLOCK):
        a_BxK = approx_QxK[start:start + _RECALL_BLOCK]
        e_BxK = exact_QxK[start:start + _RECALL_BLOCK]
        valid_BxK = e_BxK >= 0
        found_BxK = (e_BxK[:, :, None] == a_BxK[:, None, :]).any(axis=2) & valid_BxK
        hits_Q.append(found_BxK.sum(axis=1))
        wanted_Q.append(valid_BxK.sum(axis=1))
    hits_Q, wanted_Q = np.concatenate(hits_Q), np.concatenate(wanted_Q)
    counted_Q = wanted_Q > 0
    if not counted_Q.any():
        raise ValueError("exact_rows holds no valid rows (all -1): recall is undefined")
    return hits_Q[counted_Q] / wanted_Q[counted_Q]


def measure(searcher, exact, queries: np.ndarray, k: int = 10) -> float:
    """Recall@k of `searcher` against `exact` (both with `search(queries, k)`) on queries [Q, D]."""
    _, approx_QxK = searcher.search(queries, k)
    _, exact_QxK = exact.search(queries, k)
    return recall_at_k(approx_QxK, exact_QxK)


def clustered_vectors(num_items: int, num_queries: int, dim: int, *, num_clusters: int = 1000,
                      spread: float = 0.5, norm_sigma: float = 0.4,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Recommender-like synthetic vectors: Zipf-sized clusters, log-normal item norms.

    Items and queries are drawn independently from the same cluster mixture, so the queries are
    held out. Each vector is its cluster's unit centre plus Gaussian noise of norm ~`spread`;
    items are then rescaled to log-normal norms (popular items score higher), queries to unit
    norm.

    Returns:
      items [num_items, dim] float32 and queries [num_queries, dim] float32.
    """
    rng = np.random.default_rng(seed)
    centres_CxD = rng.standard_normal((num_clusters, dim), dtype=np.float32)
    centres_CxD /= np.linalg.norm(centres_CxD, axis=1, keepdims=True)
    p_C = 1.0 / np.arange(1, num_clusters + 1)
    p_C /= p_C.sum()

    def draw(n: int) -> np.ndarray:
        x_NxD = centres_CxD[rng.choice(num_clusters, size=n, p=p_C)]
        x_NxD += rng.standard_normal((n, dim), dtype=np.float32) * np.float32(spread / dim**0.5)
        return x_NxD / np.linalg.norm(x_NxD, axis=1, keepdims=True)

    items_NxD = draw(num_items)
    items_NxD *= rng.lognormal(0.0, norm_sigma, size=(num_items, 1)).astype(np.float32)
    return items_NxD, draw(num_queries)
