"""Retrieval loss pieces against a plain numpy reference."""

import numpy as np

from recsys.models import losses


def _reference(q, c, temperature, items, log_q=None, remove_hits=True):
    logits = q @ c.T / temperature
    if log_q is not None:
        logits = logits - log_q[None, :]
    b = len(q)
    for i in range(b):
        for j in range(b):
            if remove_hits and i != j and items[i] == items[j]:
                logits[i, j] = -1e9
    m = logits.max(axis=1, keepdims=True)
    log_softmax = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(log_softmax))


def test_in_batch_softmax_matches_numpy_with_logq_and_hit_masking():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, 4)).astype(np.float32)
    c = rng.standard_normal((6, 4)).astype(np.float32)
    items = np.array([3, 5, 3, 7, 8, 5])  # rows 0/2 and 1/5 hold the same item
    log_q = np.log(rng.uniform(0.01, 0.5, 6)).astype(np.float32)
    for lq in (None, log_q):
        for hits in (False, True):
            got = losses.in_batch_softmax_loss(q, c, 0.5, items, lq, remove_accidental_hits=hits)
            np.testing.assert_allclose(float(got), _reference(q, c, 0.5, items, lq, hits), rtol=1e-5)


def test_accidental_hit_masking_changes_only_duplicate_columns():
    logits = np.zeros((3, 3), np.float32)
    items = np.array([1, 2, 1])
    masked = np.asarray(losses.mask_accidental_hits(logits, np.arange(3), items, items))
    assert masked[0, 2] == losses.MASK_VALUE and masked[2, 0] == losses.MASK_VALUE
    assert masked[0, 0] == 0 and masked[1, 0] == 0 and masked[1, 2] == 0


def test_logq_correction_subtracts_log_frequency():
    counts = np.array([0, 90, 10])
    log_q = losses.log_sampling_probability(counts)
    np.testing.assert_allclose(log_q[1:], np.log([0.9, 0.1]), rtol=1e-6)
    assert np.isfinite(log_q[0])
    corrected = np.asarray(losses.logq_correct(np.zeros((1, 2), np.float32), log_q[1:]))
    # Popular candidates (sampled as negatives more often) score lower than rare ones.
    assert corrected[0, 0] < corrected[0, 1]
    np.testing.assert_allclose(corrected[0], -log_q[1:], rtol=1e-6)


def test_softmax_cross_entropy_weighted():
    logits = np.array([[2.0, 0.0], [0.0, 2.0]], np.float32)
    loss = losses.softmax_cross_entropy(logits, np.array([0, 0]), np.array([1.0, 0.0]))
    np.testing.assert_allclose(float(loss), np.log1p(np.exp(-2.0)), rtol=1e-6)
