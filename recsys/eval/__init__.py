"""Evaluation math: exact full-catalogue ranking and the protocol's metrics, independent of models."""

from recsys.eval.metrics import (
    catalog_coverage,
    hit_rate_at_k,
    intra_list_diversity,
    ndcg_at_k,
    ranking_metrics,
)
from recsys.eval.ranking import exact_topk, target_ranks

__all__ = [
    "catalog_coverage",
    "exact_topk",
    "hit_rate_at_k",
    "intra_list_diversity",
    "ndcg_at_k",
    "ranking_metrics",
    "target_ranks",
]
