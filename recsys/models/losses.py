"""Retrieval loss pieces, one concern each: in-batch logits, logQ correction, hit masking, softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Large negative instead of -inf so that an all-masked row still has a finite softmax.
MASK_VALUE = -1e9


def in_batch_logits(q_BxD, c_NxD, temperature):
    """Scores of every query against every candidate: [B, N] = q · c / temperature."""
    return jnp.einsum("bd,nd->bn", q_BxD, c_NxD) / temperature


def logq_correct(logits_BxN, log_q_N):
    """Sampled-softmax correction (Yi et al. 2019): subtract log q(candidate) from each column.

    Candidates that enter the batch as other rows' positives are drawn by popularity, so without
    the correction popular items are over-penalised as negatives.
    """
    return logits_BxN - log_q_N[None, :]


def mask_accidental_hits(logits_BxN, labels_B, query_items_B, candidate_items_N):
    """Masks negatives that are the same item as the row's positive (it would be a false negative)."""
    same_BxN = query_items_B[:, None] == candidate_items_N[None, :]
    is_label_BxN = jnp.arange(logits_BxN.shape[1])[None, :] == labels_B[:, None]
    return jnp.where(same_BxN & ~is_label_BxN, MASK_VALUE, logits_BxN)


def softmax_cross_entropy(logits_BxN, labels_B, weights_B=None):
    """Mean cross-entropy of the label column per row (weighted rows when weights are given)."""
    log_p_BxN = jax.nn.log_softmax(logits_BxN, axis=-1)
    nll_B = -jnp.take_along_axis(log_p_BxN, labels_B[:, None], axis=1)[:, 0]
    if weights_B is None:
        return nll_B.mean()
    return (nll_B * weights_B).sum() / jnp.maximum(weights_B.sum(), 1e-6)


def log_sampling_probability(item_counts_V: np.ndarray) -> np.ndarray:
    """log q(item) from how often each item is a training target: [V] float32.

    Items never seen get the smallest observed probability (they cannot be in-batch negatives,
    but the value must be finite).
    """
    counts = np.asarray(item_counts_V, np.float64)
    total = max(counts.sum(), 1.0)
    floor = counts[counts > 0].min() if (counts > 0).any() else 1.0
    return np.log(np.maximum(counts, floor) / total).astype(np.float32)


def in_batch_softmax_loss(q_BxD, c_BxD, temperature, item_B, log_q_B=None,
                          remove_accidental_hits=True):
    """In-batch sampled softmax over the (global) batch: row i's positive is column i."""
    logits_BxB = in_batch_logits(q_BxD, c_BxD, temperature)
    if log_q_B is not None:
        logits_BxB = logq_correct(logits_BxB, log_q_B)
    labels_B = jnp.arange(q_BxD.shape[0])
    if remove_accidental_hits:
        logits_BxB = mask_accidental_hits(logits_BxB, labels_B, item_B, item_B)
    return softmax_cross_entropy(logits_BxB, labels_B)
