"""Retrieval loss pieces, one concern each: logits per negative source, logQ correction, hit masking,
hard-negative selection, softmax."""

from __future__ import annotations

import dataclasses

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
    return sampled_softmax_loss(q_BxD, c_BxD, temperature, item_B, log_q_B=log_q_B,
                                remove_accidental_hits=remove_accidental_hits)


@dataclasses.dataclass(frozen=True)
class Negatives:
    """Negatives of one extra source, scored against every row (shared) or one row each.

    Attributes:
      c: candidate vectors, [M, D] shared by all rows or [B, H, D] per row.
      items: their item rows, [M] or [B, H]; row 0 means "no negative" and is always masked.
      log_q: log of the probability with which this source drew each candidate (same shape as
        items), subtracted from its logits; None for no correction.
    """

    c: jax.Array
    items: jax.Array
    log_q: jax.Array | None = None


def per_row_logits(q_BxD, c_BxHxD, temperature):
    """Scores of each query against its own H candidates: [B, H]."""
    return jnp.einsum("bd,bhd->bh", q_BxD, c_BxHxD) / temperature


def mask_positive_and_padding(logits_BxN, item_B, candidate_items, remove_accidental_hits=True):
    """Masks candidates equal to the row's positive (accidental hits) and padding candidates (row 0).

    candidate_items is [N] (shared by every row) or [B, N] (one list per row); none of these
    columns is the label column, so every match is a false negative.
    """
    cand_BxN = jnp.broadcast_to(candidate_items, logits_BxN.shape)
    drop_BxN = cand_BxN == 0
    if remove_accidental_hits:
        drop_BxN = drop_BxN | (cand_BxN == item_B[:, None])
    return jnp.where(drop_BxN, MASK_VALUE, logits_BxN)


def keep_hardest_negatives(logits_BxN, labels_B, k: int):
    """Keeps the label and the k highest-scoring negatives of each row; masks the other columns.

    Ranked by the logits that enter the softmax (after corrections and masking), so the kept
    columns are the terms that dominate each row's partition function. Ties at the k-th value
    keep every tied column. The selection is a constant of the step (no gradient through it).
    """
    n = logits_BxN.shape[1]
    if k <= 0 or k >= n - 1:
        return logits_BxN
    is_label_BxN = jnp.arange(n)[None, :] == labels_B[:, None]
    neg_BxN = jax.lax.stop_gradient(jnp.where(is_label_BxN, MASK_VALUE, logits_BxN))
    kth_B = _kth_largest(neg_BxN, k)
    keep_BxN = is_label_BxN | (neg_BxN >= kth_B[:, None])
    return jnp.where(keep_BxN, logits_BxN, MASK_VALUE)


def _kth_largest(x_BxN, k: int, iterations: int = 32):
    """The k-th largest unmasked value per row, by bisection on the value: [B].

    lax.top_k sorts on CPU (about 17x slower at [512, 1024], k = 128); counting how many values
    clear a threshold halves its interval per step, and 32 halvings reach float32 resolution.
    Rows with fewer than k unmasked values get a threshold below all of them.
    """
    valid_BxN = x_BxN > MASK_VALUE / 2
    lo_B = jnp.min(jnp.where(valid_BxN, x_BxN, jnp.inf), axis=1) - 1.0
    lo_B = jnp.where(valid_BxN.any(axis=1), lo_B, MASK_VALUE)
    hi_B = jnp.max(jnp.where(valid_BxN, x_BxN, MASK_VALUE), axis=1) + 1.0

    def halve(_, bounds):  # invariant: >= k values clear lo (when there are k), < k clear hi
        lo_B, hi_B = bounds
        mid_B = 0.5 * (lo_B + hi_B)
        enough_B = (x_BxN >= mid_B[:, None]).sum(axis=1) >= k
        return jnp.where(enough_B, mid_B, lo_B), jnp.where(enough_B, hi_B, mid_B)

    return jax.lax.fori_loop(0, iterations, halve, (lo_B, hi_B))[0]


def source_logits(q_BxD, item_B, source: Negatives, temperature, remove_accidental_hits=True):
    """Corrected, masked logits of one extra negative source: [B, M] or [B, H]."""
    if source.c.ndim == 2:
        logits = in_batch_logits(q_BxD, source.c, temperature)
    else:
        logits = per_row_logits(q_BxD, source.c, temperature)
    if source.log_q is not None:
        logits = logits - jnp.broadcast_to(source.log_q, logits.shape)
    return mask_positive_and_padding(logits, item_B, source.items, remove_accidental_hits)


def sampled_softmax_loss(q_BxD, c_BxD, temperature, item_B, *, log_q_B=None,
                         extra: tuple[Negatives, ...] = (), hard_negatives: int = 0,
                         remove_accidental_hits=True):
    """Sampled softmax over in-batch negatives plus extra sources (mixed negative sampling).

    Row i's positive is column i of the in-batch block. Each source's logits are corrected by
    its own log q, the probability with which that source draws an item (Yang et al. 2020):
    in-batch columns by the item's frequency among targets, uniform ones by log(1/N). With n_s
    draws from source s, the sum over all columns of exp(s_j) / q_s(j), divided by sum_s n_s,
    is an unbiased estimate of the full partition function, so per-source log q is all the
    correction mixing needs (the shared constant log(sum_s n_s) cancels in the softmax).

    Args:
      q_BxD, c_BxD: query and positive-item vectors; temperature: scalar.
      item_B: positive item rows (for accidental-hit masking).
      log_q_B: log q of each in-batch candidate, or None for no correction.
      extra: further negative sources, each corrected by its own log_q and masked.
      hard_negatives: keep only this many highest-scoring negatives per row (0 = all).

    Returns:
      The mean cross-entropy over rows.
    """
    logits_BxB = in_batch_logits(q_BxD, c_BxD, temperature)
    if log_q_B is not None:
        logits_BxB = logq_correct(logits_BxB, log_q_B)
    labels_B = jnp.arange(q_BxD.shape[0])
    if remove_accidental_hits:
        logits_BxB = mask_accidental_hits(logits_BxB, labels_B, item_B, item_B)
    blocks = [logits_BxB] + [source_logits(q_BxD, item_B, s, temperature, remove_accidental_hits)
                             for s in extra]
    logits_BxN = jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else logits_BxB
    logits_BxN = keep_hardest_negatives(logits_BxN, labels_B, hard_negatives)
    return softmax_cross_entropy(logits_BxN, labels_B)
