"""Tests for recsys.eval.metrics against hand-computed cases."""

import math

import numpy as np
import pytest

from recsys.eval import (
    catalog_coverage,
    hit_rate_at_k,
    intra_list_diversity,
    ndcg_at_k,
    ranking_metrics,
)


def test_ranking_metrics_hand_computed():
    m = ranking_metrics(np.array([0, 3, 12, 60, 200]))
    assert m["hr@10"] == pytest.approx(0.4)
    assert m["hr@50"] == pytest.approx(0.6)
    assert m["hr@100"] == pytest.approx(0.8)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 5)
    assert m["ndcg@50"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 13 + 1 / 61 + 1 / 201) / 5)


def test_ranking_metrics_cutoff_is_strict_and_ndcg10_always_present():
    m = ranking_metrics([9, 10], ks=(10,))
    assert m["hr@10"] == 0.5
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(11) / 2)
    assert set(ranking_metrics([0], ks=(5,))) == {"hr@5", "ndcg@5", "ndcg@10", "mrr"}


@pytest.mark.parametrize("bad", [[], [[0, 1]], [-1, 2]])
def test_ranking_metrics_rejects_bad_ranks(bad):
    with pytest.raises(ValueError, match="ranks_Q"):
        ranking_metrics(np.array(bad))


def test_list_metrics_from_positions():
    lists = np.array([[5, 7, 9], [1, 2, 3], [4, 4, -1], [8, 6, 7]])
    targets = np.array([7, 3, 4, 2])  # positions 1, 2, 0, absent
    assert hit_rate_at_k(lists, targets, 1) == pytest.approx(0.25)
    assert hit_rate_at_k(lists, targets, 2) == pytest.approx(0.5)
    assert hit_rate_at_k(lists, targets, 10) == pytest.approx(0.75)
    assert ndcg_at_k(lists, targets, 2) == pytest.approx((1 / math.log2(3) + 1) / 4)
    assert ndcg_at_k(lists, targets, 3) == pytest.approx((1 / math.log2(3) + 0.5 + 1) / 4)
    # A target missing from a short list is a miss even when k exceeds the list length.
    assert ndcg_at_k(lists[3:], targets[3:], 100) == 0.0


def test_list_metrics_agree_with_ranking_metrics():
    rng = np.random.default_rng(0)
    lists = np.stack([rng.permutation(np.arange(1, 51)) for _ in range(30)])
    targets = rng.integers(1, 80, 30)
    ranks = np.array([list(row).index(t) if t in row else 10**6 for row, t in zip(lists, targets)])
    m = ranking_metrics(ranks, ks=(10,))
    assert ndcg_at_k(lists, targets, 10) == pytest.approx(m["ndcg@10"])
    assert hit_rate_at_k(lists, targets, 10) == pytest.approx(m["hr@10"])


def test_list_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="targets_Q"):
        ndcg_at_k(np.ones((3, 4), int), np.ones(2, int), 10)


def test_intra_list_diversity_cosine():
    genres = np.array([[0, 0], [1, 0], [1, 0], [0, 1], [1, 1], [0, 0]], float)
    # Identical genres: 0; orthogonal: 1; padding ignored.
    assert intra_list_diversity([[1, 2, -1]], genres) == pytest.approx(0.0)
    assert intra_list_diversity([[1, 3, 0]], genres) == pytest.approx(1.0)
    # [1, 3, 4]: pairs (1,3)=1, (1,4)=1-1/sqrt2, (3,4)=1-1/sqrt2.
    expected = (1 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert intra_list_diversity([[1, 3, 4]], genres) == pytest.approx(expected)
    # Lists with fewer than two items are skipped; an item without genres is distance 1.
    assert intra_list_diversity([[1, 2, 3], [4, -1, -1]], genres) == pytest.approx(2 / 3)
    assert intra_list_diversity([[5, 1]], genres) == pytest.approx(1.0)
    assert math.isnan(intra_list_diversity([[1, -1]], genres))


def test_intra_list_diversity_matches_pairwise_loop():
    rng = np.random.default_rng(1)
    genres = (rng.random((40, 6)) < 0.3).astype(float)
    lists = rng.integers(1, 40, (8, 5))
    per_list = []
    for row in lists:
        u = genres[row] / np.maximum(np.linalg.norm(genres[row], axis=1, keepdims=True), 1e-30)
        d = 1 - u @ u.T
        per_list.append(d[~np.eye(5, dtype=bool)].mean())
    assert intra_list_diversity(lists, genres) == pytest.approx(np.mean(per_list))


def test_catalog_coverage():
    lists = np.array([[1, 2, 2], [2, 5, -1], [0, 1, 5]])
    assert catalog_coverage(lists, num_items=10) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="num_items"):
        catalog_coverage(lists, num_items=4)
