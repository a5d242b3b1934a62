"""Tests for recsys.eval.ranking: exact target ranks and top-k against numpy brute force."""

import resource

import numpy as np
import pytest

from recsys.eval import exact_topk, ranking, target_ranks


def _scores(q_QxD, items_NxD):
    """float64 scores in which equal item vectors score exactly equal (BLAS does not promise it)."""
    return np.stack([(q.astype(np.float64) * items_NxD).sum(1) for q in q_QxD])


def _reference_ranks(q_QxD, items_NxD, targets_Q, offsets, excluded):
    """Valid items other than the target with score >= the target's, not excluded (float64)."""
    s_QxN = _scores(q_QxD, items_NxD)
    ranks = []
    for i, t in enumerate(targets_Q):
        counted = np.ones(len(items_NxD), bool)
        counted[0] = False
        counted[excluded[offsets[i]:offsets[i + 1]]] = False
        counted[t] = False
        ranks.append(int(np.sum(counted & (s_QxN[i] >= s_QxN[i, t]))))
    return np.array(ranks)


def _reference_topk(q_QxD, items_NxD, k, offsets, excluded):
    s_QxN = _scores(q_QxD, items_NxD)
    s_QxN[:, 0] = -np.inf
    for i in range(len(q_QxD)):
        s_QxN[i, excluded[offsets[i]:offsets[i + 1]]] = -np.inf
    rows = np.argsort(-s_QxN, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s_QxN, rows, axis=1), rows


def _integer_problem(seed, q=40, n=301, d=6, max_excluded=25):
    """Small-integer vectors: scores are exact in float32 and ties are plentiful."""
    rng = np.random.default_rng(seed)
    q_QxD = rng.integers(-2, 3, (q, d)).astype(np.float32)
    items_NxD = rng.integers(-2, 3, (n, d)).astype(np.float32)
    targets = rng.integers(1, n, q)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(0, max_excluded, q))])
    excluded = rng.integers(0, n, offsets[-1])
    return q_QxD, items_NxD, targets, offsets, excluded


def test_tie_with_target_counts_against_it():
    items = np.array([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0]], np.float32)
    q = np.array([[1.0, 0.0]], np.float32)
    # Target row 1; row 3 has the same vector, row 0 (padding) scores higher but never counts.
    assert target_ranks(q, items, [1]).tolist() == [1]
    assert target_ranks(q, items, [3]).tolist() == [1]
    assert target_ranks(q, items, [4]).tolist() == [2]


def test_exclusions_with_duplicates_and_the_target_itself():
    items = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [4, 0], [5, 0]], np.float32)
    q = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    # Query 0: target 2, items 3..5 above it; excludes 4 twice, the target and row 0.
    # Query 1: target 1, excludes nothing.
    offsets = np.array([0, 5, 5])
    excluded = np.array([4, 2, 4, 0, 2])
    ranks = target_ranks(q, items, [2, 1], offsets, excluded)
    assert ranks.tolist() == [2, 4]


@pytest.mark.parametrize("seed", [0, 1])
def test_ranks_match_brute_force_for_any_chunking(seed):
    q, items, targets, offsets, excluded = _integer_problem(seed)
    excluded[offsets[3]:offsets[4]] = targets[3]  # the target in its own exclusion list
    expected = _reference_ranks(q, items, targets, offsets, excluded)
    for chunk, block in [(7, 6), (64, 1024), (10**9, 1024)]:
        got = target_ranks(q, items, targets, offsets, excluded, item_chunk=chunk,
                           query_block=block)
        np.testing.assert_array_equal(got, expected, err_msg=f"item_chunk={chunk}")
        assert got.dtype == np.int64


def test_float_vectors_chunking_invariant_and_copies_tie():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((50, 16)).astype(np.float32)
    items = rng.standard_normal((500, 16)).astype(np.float32)
    targets = rng.integers(1, 500, 50)
    items[[17, 230, 499]] = items[targets[0]]  # exact copies in different chunks
    offsets = np.concatenate([[0], np.cumsum(rng.integers(0, 10, 50))])
    excluded = rng.integers(1, 500, offsets[-1])
    expected = _reference_ranks(q, items, targets, offsets, excluded)
    small = target_ranks(q, items, targets, offsets, excluded, item_chunk=7)
    big = target_ranks(q, items, targets, offsets, excluded, item_chunk=10**9)
    np.testing.assert_array_equal(small, big)
    np.testing.assert_array_equal(small, expected)


def test_ranks_reject_bad_inputs():
    items = np.ones((5, 2), np.float32)
    q = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match="targets_Q"):
        target_ranks(q, items, [0, 1])
    with pytest.raises(ValueError, match="exclude_offsets"):
        target_ranks(q, items, [1, 2], [0, 1], [3])
    with pytest.raises(ValueError, match="exclude_items"):
        target_ranks(q, items, [1, 2], [0, 1, 1], [5])
    with pytest.raises(ValueError, match="q_QxD"):
        target_ranks(np.ones((2, 3)), items, [1, 2])


@pytest.mark.parametrize("chunk", [7, 10**9])
def test_exact_topk_matches_argsort(chunk):
    q, items, _, offsets, excluded = _integer_problem(3)
    exp_scores, exp_rows = _reference_topk(q, items, 12, offsets, excluded)
    scores, rows = exact_topk(q, items, 12, offsets, excluded, item_chunk=chunk, query_block=16)
    np.testing.assert_array_equal(rows, exp_rows)  # ties broken by lowest row, like argsort
    np.testing.assert_array_equal(scores, exp_scores.astype(np.float32))
    assert not np.isin(0, rows)


def test_exact_topk_without_exclusions_and_short_catalogue():
    items = np.array([[0, 0], [1, 0], [3, 0], [2, 0]], np.float32)
    q = np.array([[1.0, 0.0]], np.float32)
    scores, rows = exact_topk(q, items, 3, item_chunk=2)
    assert rows.tolist() == [[2, 3, 1]] and scores.tolist() == [[3.0, 2.0, 1.0]]
    # Fewer than k items left after exclusions: -inf scores and row -1.
    scores, rows = exact_topk(q, items, 3, [0, 2], [2, 2])
    assert rows.tolist() == [[3, 1, -1]] and scores[0, 2] == -np.inf
    with pytest.raises(ValueError, match="k=4"):
        exact_topk(q, items, 4)


def test_large_call_is_chunked():
    """Q=2000 x N=200000: peak memory stays far below a full Q x N score matrix."""
    rng = np.random.default_rng(4)
    num_q, n, d = 2000, 200_000, 32
    q = rng.standard_normal((num_q, d), dtype=np.float32)
    items = rng.standard_normal((n, d), dtype=np.float32)
    targets = rng.integers(1, n, num_q)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ranks = target_ranks(q, items, targets, item_chunk=16384, query_block=512)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert growth < num_q * n * 4 / 4, f"peak RSS grew {growth / 1e6:.0f} MB"
    no_ex = np.zeros(21, np.int64)
    np.testing.assert_array_equal(
        ranks[:20], _reference_ranks(q[:20], items, targets[:20], no_ex, no_ex[:0]))


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 1)])
def test_sharded_topk_equals_the_single_device_search_on_any_mesh(shape):
    import jax

    from recsys import sharding
    from recsys.config import MeshConfig
    rng = np.random.default_rng(0)
    items = rng.standard_normal((2003, 8)).astype(np.float32)
    items[7] = items[9]  # a tie: the lower row comes first on every mesh
    q = rng.standard_normal((70, 8)).astype(np.float32)
    q[0] = items[9]
    mesh = sharding.make_mesh(MeshConfig(data=shape[0], model=shape[1]),
                              devices=jax.devices()[:shape[0] * shape[1]])
    scores, rows = ranking.sharded_topk(q, items, 10, mesh, item_chunk=128, query_block=32)
    want_scores, want_rows = ranking.exact_topk(q, items, 10)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    first = list(rows[0]).index(7)
    assert 0 not in rows and rows[0, first + 1] == 9  # equal scores: the lower row first
