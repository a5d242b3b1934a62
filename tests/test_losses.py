"""Retrieval loss pieces against a plain numpy reference."""

import numpy as np
import pytest

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


# ------------------------------------------------------- mixed, hard and mined negatives


def _log_softmax_nll(logits, labels):
    m = logits.max(axis=1, keepdims=True)
    log_p = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    return -np.mean(log_p[np.arange(len(labels)), labels])


def _mixed_reference(q, c, t, items, log_q, uni_c, uni_items, uni_log_q, mined_c, mined_items,
                     mined_log_q, hard_k):
    """Loop-by-loop numpy version of the mixed softmax: columns = batch, uniform, per-row mined."""
    b = len(q)
    rows = []
    for i in range(b):
        row = []
        for j in range(b):  # in-batch: column i is the positive
            v = q[i] @ c[j] / t - log_q[j]
            row.append(-1e9 if j != i and items[j] == items[i] else v)
        for j in range(len(uni_items)):
            v = q[i] @ uni_c[j] / t - uni_log_q[j]
            row.append(-1e9 if uni_items[j] == items[i] else v)
        for h in range(mined_items.shape[1]):
            v = q[i] @ mined_c[i, h] / t - mined_log_q[i, h]
            row.append(-1e9 if mined_items[i, h] in (0, items[i]) else v)
        row = np.array(row)
        if hard_k:
            negatives = np.delete(row, i)
            kth = np.sort(negatives)[::-1][hard_k - 1]
            keep = row >= kth
            keep[i] = True
            row = np.where(keep, row, -1e9)
        rows.append(row)
    return _log_softmax_nll(np.array(rows), np.arange(b))


@pytest.mark.parametrize("hard_k", [0, 3])
def test_mixed_negatives_match_numpy_reference_with_each_correction_and_masking(hard_k):
    rng = np.random.default_rng(1)
    b, m, h, d = 5, 4, 3, 6
    q = rng.standard_normal((b, d)).astype(np.float32)
    c = rng.standard_normal((b, d)).astype(np.float32)
    items = np.array([3, 5, 3, 7, 8])
    log_q = np.log(rng.uniform(0.01, 0.5, b)).astype(np.float32)
    uni_items = np.array([5, 9, 3, 11])  # 5 and 3 are positives of some rows: accidental hits
    uni_c = rng.standard_normal((m, d)).astype(np.float32)
    uni_log_q = np.full(m, -np.log(20.0), np.float32)
    mined_items = np.array([[4, 0, 6], [2, 5, 1], [9, 9, 0], [7, 12, 13], [14, 15, 16]])
    mined_c = rng.standard_normal((b, h, d)).astype(np.float32)
    mined_log_q = np.log(rng.uniform(0.01, 0.5, (b, h))).astype(np.float32)
    got = losses.sampled_softmax_loss(
        q, c, 0.5, items, log_q_B=log_q, hard_negatives=hard_k,
        extra=(losses.NegativeSource(uni_c, uni_items, uni_log_q),
               losses.NegativeSource(mined_c, mined_items, mined_log_q)))
    want = _mixed_reference(q, c, 0.5, items, log_q, uni_c, uni_items, uni_log_q, mined_c,
                            mined_items, mined_log_q, hard_k)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_uniform_correction_is_what_makes_the_mixed_softmax_unbiased():
    """Uniform draws corrected by log(1/N) estimate the full softmax; uncorrected ones do not."""
    rng = np.random.default_rng(0)
    n, d, m = 50, 4, 200_000
    q = rng.standard_normal((1, d)).astype(np.float32)
    all_c = rng.standard_normal((n, d)).astype(np.float32)
    full = _log_softmax_nll((q @ all_c.T)[None, 0][:, [0] + list(range(1, n))], np.array([0]))
    draws = rng.integers(1, n, m)  # uniform over the negatives 1..n-1
    pos = losses.NegativeSource(all_c[draws], draws + 100, np.full(m, -np.log(n - 1.0), np.float32))
    # m corrected draws carry m times the negatives' mass: log q = log(1/m) for the positive
    # puts it on the same scale (in a real batch this shared constant cancels).
    est = losses.sampled_softmax_loss(q, all_c[:1], 1.0, np.array([0]),
                                      log_q_B=np.array([-np.log(m)], np.float32), extra=(pos,))
    np.testing.assert_allclose(float(est), full, atol=0.02)
    raw = losses.sampled_softmax_loss(q, all_c[:1], 1.0, np.array([0]),
                                      extra=(losses.NegativeSource(all_c[draws], draws + 100),))
    assert abs(float(raw) - full) > 1.0


def test_keep_hardest_negatives_keeps_label_and_top_k():
    logits = np.array([[0.0, 5.0, 1.0, 3.0, -1.0],
                       [9.0, 2.0, 8.0, 7.0, 1.0]], np.float32)
    out = np.asarray(losses.keep_hardest_negatives(logits, np.array([0, 4]), 2))
    kept = out > losses.MASK_VALUE / 2
    np.testing.assert_array_equal(kept, [[True, True, False, True, False],
                                         [True, False, True, False, True]])
    np.testing.assert_array_equal(out[kept], logits[kept])
    # k covering every negative changes nothing.
    np.testing.assert_array_equal(np.asarray(losses.keep_hardest_negatives(logits, np.array([0, 4]), 4)),
                                  logits)


def test_hard_negative_selection_passes_no_gradient_through_the_mask():
    import jax

    def loss(q):
        logits = q @ np.eye(4, dtype=np.float32)
        return losses.softmax_cross_entropy(
            losses.keep_hardest_negatives(logits, np.array([0]), 1), np.array([0]))

    q = np.array([[1.0, 3.0, 2.0, -1.0]], np.float32)
    g = np.asarray(jax.grad(loss)(q))
    assert g[0, 2] == 0 and g[0, 3] == 0  # dropped columns get no gradient
    assert g[0, 1] > 0 and g[0, 0] < 0


def test_padding_candidates_are_always_masked():
    logits = np.zeros((2, 3), np.float32)
    out = np.asarray(losses.mask_positive_and_padding(logits, np.array([4, 5]),
                                                      np.array([[0, 4, 6], [5, 1, 0]]),
                                                      remove_accidental_hits=False))
    np.testing.assert_array_equal(out == losses.MASK_VALUE, [[True, False, False],
                                                              [False, False, True]])


def test_keep_hardest_negatives_matches_a_sort_with_masked_columns():
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((64, 300)) * 8).astype(np.float32)
    logits[rng.random(logits.shape) < 0.3] = losses.MASK_VALUE
    logits[5, :] = losses.MASK_VALUE  # a row with nothing left but its label
    logits[6, 20:] = losses.MASK_VALUE  # a row with fewer than k negatives
    labels = rng.integers(0, 300, 64)
    k = 40
    out = np.asarray(losses.keep_hardest_negatives(logits, labels, k))
    for i in range(64):
        neg = np.delete(logits[i], labels[i])
        valid = np.sort(neg[neg > losses.MASK_VALUE / 2])[::-1]
        want = set(np.flatnonzero(logits[i] >= valid[k - 1])) if len(valid) >= k else set(
            np.flatnonzero(logits[i] > losses.MASK_VALUE / 2))
        want.add(labels[i])
        got = set(np.flatnonzero(out[i] > losses.MASK_VALUE / 2)) | {labels[i]}
        assert got == want, i


# ------------------------------------------------------- shape errors at the entry points


def _vectors(b=4, d=3):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((b, d)).astype(np.float32),
            rng.standard_normal((b, d)).astype(np.float32), np.arange(1, b + 1))


@pytest.mark.parametrize("change, message", [
    ({"c_BxD": np.zeros((4, 5), np.float32)}, r"q_BxD \(4, 3\) and c_BxD \(4, 5\) must both be \[B, D\]"),
    ({"c_BxD": np.zeros((6, 3), np.float32)}, r"q_BxD \(4, 3\) and c_BxD \(6, 3\)"),
    ({"item_B": np.arange(5)}, r"item_B \(5,\) must be \(4,\) to match q_BxD \(4, 3\)"),
    ({"log_q_B": np.zeros(3, np.float32)}, r"log_q_B \(3,\) must be \(4,\) to match q_BxD \(4, 3\)"),
    ({"extra": (losses.NegativeSource(np.zeros((5, 2), np.float32), np.arange(5)),)},
     r"q_BxD \(4, 3\) and c_NxD \(5, 2\) must be \[B, D\] and \[\.\.\., D\] with the same D"),
    ({"extra": (losses.NegativeSource(np.zeros((5, 3), np.float32), np.arange(4)),)},
     r"negative items \(4,\) must match their vectors \(5, 3\)"),
    ({"extra": (losses.NegativeSource(np.zeros((5, 3), np.float32), np.arange(5),
                                      np.zeros(4, np.float32)),)},
     r"negative log_q \(4,\) must match their items \(5,\)"),
    ({"extra": (losses.NegativeSource(np.zeros((3, 2, 3), np.float32), np.ones((3, 2), np.int32)),)},
     r"c_BxHxD \(3, 2, 3\) must be \[B, H, D\] for q_BxD \(4, 3\)"),
])
def test_sampled_softmax_names_both_shapes_when_they_disagree(change, message):
    q, c, items = _vectors()
    args = {"q_BxD": q, "c_BxD": c, "temperature": 0.5, "item_B": items, **change}
    with pytest.raises(ValueError, match=message):
        losses.sampled_softmax_loss(**args)


def test_loss_pieces_name_both_shapes():
    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"labels_B \(3,\) must be \(2,\) to match logits_BxN \(2, 3\)"):
        losses.softmax_cross_entropy(logits, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"weights_B \(1,\) must be \(2,\)"):
        losses.softmax_cross_entropy(logits, np.zeros(2, np.int32), np.ones(1, np.float32))
    with pytest.raises(ValueError, match=r"log_q_N \(2,\) must be \(3,\) to match logits_BxN \(2, 3\)"):
        losses.logq_correct(logits, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"candidate_items_N \(2,\) must be \(3,\)"):
        losses.mask_accidental_hits(logits, np.arange(2), np.arange(2), np.arange(2))
    with pytest.raises(ValueError, match=r"candidate_items \(3, 3\) must be \[N\] or \[B, N\]"):
        losses.mask_positive_and_padding(logits, np.arange(2), np.ones((3, 3), np.int32))
    with pytest.raises(ValueError, match=r"labels_B \(1,\) must be \(2,\)"):
        losses.keep_hardest_negatives(logits, np.zeros(1, np.int32), 1)
