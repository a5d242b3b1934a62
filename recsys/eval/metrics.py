"""Protocol metrics from target ranks or recommended lists: HR@K, NDCG@K, MRR, diversity, coverage."""

from __future__ import annotations

import numpy as np


def ranking_metrics(ranks_Q, ks=(10, 50, 100)) -> dict[str, float]:
    """Averages over queries of one-target metrics from 0-based full-catalogue ranks.

    Args:
      ranks_Q: 0-based rank of each query's target (e.g. from `target_ranks`).
      ks: cut-offs.

    Returns:
      {"hr@K": share of ranks < K, "ndcg@K": mean of 1/log2(rank+2) where rank < K, else 0}
      for each K in ks and K = 10, plus "mrr": mean of 1/(rank+1).
    """
    ranks_Q = np.asarray(ranks_Q)
    if ranks_Q.ndim != 1 or ranks_Q.size == 0 or np.any(ranks_Q < 0):
        raise ValueError(f"ranks_Q must be a non-empty [Q] array of ranks >= 0, "
                         f"got shape {ranks_Q.shape}")
    ranks_Q = ranks_Q.astype(np.float64)
    gain_Q = 1.0 / np.log2(ranks_Q + 2.0)
    out = {}
    for k in ks:
        out[f"hr@{k}"] = float(np.mean(ranks_Q < k))
    for k in sorted({*ks, 10}):
        out[f"ndcg@{k}"] = float(np.mean(np.where(ranks_Q < k, gain_Q, 0.0)))
    out["mrr"] = float(np.mean(1.0 / (ranks_Q + 1.0)))
    return out


def hit_rate_at_k(ranked_lists_QxL, targets_Q, k: int) -> float:
    """Share of queries whose target is among the first k entries of its list."""
    pos_Q = _target_positions(ranked_lists_QxL, targets_Q)
    return float(np.mean(pos_Q < k))


def ndcg_at_k(ranked_lists_QxL, targets_Q, k: int) -> float:
    """Mean NDCG@k with one target: 1/log2(position+2) if in the first k entries, else 0."""
    pos_Q = _target_positions(ranked_lists_QxL, targets_Q)
    gain_Q = 1.0 / np.log2(np.minimum(pos_Q, k).astype(np.float64) + 2.0)
    return float(np.mean(np.where(pos_Q < k, gain_Q, 0.0)))


def intra_list_diversity(lists_QxK, item_genres_NxG) -> float:
    """Mean over lists of the mean pairwise cosine distance (1 - cosine) of genre vectors.

    Entries < 1 (padding row 0 or -1) are ignored; lists with fewer than two items are
    skipped. An item without genres has cosine 0 with every item (distance 1).

    Args:
      lists_QxK: item rows per list.
      item_genres_NxG: genre vector per item row (multi-hot or weighted).

    Returns:
      A float in [0, 2] (in [0, 1] for non-negative genres); nan when no list has two items.
    """
    lists_QxK = np.asarray(lists_QxK)
    genres_NxG = np.asarray(item_genres_NxG, np.float64)
    if lists_QxK.ndim != 2 or genres_NxG.ndim != 2 or lists_QxK.max(initial=0) >= len(genres_NxG):
        raise ValueError(f"lists_QxK {lists_QxK.shape} must be [Q, K] rows of item_genres_NxG "
                         f"{genres_NxG.shape}")
    norm_N = np.linalg.norm(genres_NxG, axis=1, keepdims=True)
    unit_NxG = np.divide(genres_NxG, norm_N, out=np.zeros_like(genres_NxG), where=norm_N > 0)
    valid_QxK = lists_QxK >= 1
    u_QxKxG = unit_NxG[np.where(valid_QxK, lists_QxK, 0)] * valid_QxK[..., None]
    # Sum of cosines over ordered pairs i != j: |sum_i u_i|^2 - sum_i |u_i|^2.
    sim_Q = (np.square(u_QxKxG.sum(1)).sum(1) - np.square(u_QxKxG).sum((1, 2)))
    m_Q = valid_QxK.sum(1)
    has_pairs = m_Q >= 2
    if not has_pairs.any():
        return float("nan")
    pairs_Q = m_Q[has_pairs] * (m_Q[has_pairs] - 1.0)
    return float(np.mean(1.0 - sim_Q[has_pairs] / pairs_Q))


def catalog_coverage(lists, num_items: int) -> float:
    """Share of the catalogue's items (rows 1..num_items) that appear in any list.

    Args:
      lists: item rows, any shape; entries < 1 (padding) are ignored.
      num_items: real items in the catalogue, i.e. N - 1 for an [N, D] item table.
    """
    rows = np.asarray(lists).ravel()
    rows = rows[rows >= 1]
    if num_items < 1 or rows.max(initial=0) > num_items:
        raise ValueError(f"num_items={num_items} must be >= 1 and cover every listed row "
                         f"(largest {rows.max(initial=0)})")
    return float(np.unique(rows).size / num_items)


def _target_positions(ranked_lists_QxL, targets_Q) -> np.ndarray:
    """0-based position of each target in its list; int64 max where absent."""
    lists_QxL, targets_Q = np.asarray(ranked_lists_QxL), np.asarray(targets_Q)
    if lists_QxL.ndim != 2 or targets_Q.shape != (lists_QxL.shape[0],) or lists_QxL.shape[0] == 0:
        raise ValueError(f"ranked_lists_QxL {lists_QxL.shape} and targets_Q {targets_Q.shape} "
                         "must be [Q, L] and [Q] with Q >= 1")
    hit_QxL = lists_QxL == targets_Q[:, None]
    return np.where(hit_QxL.any(1), hit_QxL.argmax(1), np.iinfo(np.int64).max)
