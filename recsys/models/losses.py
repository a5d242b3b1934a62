"""Retrieval loss pieces, one concern each: logits per negative source, logQ correction, hit masking,
hard-negative selection, softmax. The public entry points check their inputs' shapes and raise a
ValueError naming both shapes when they disagree."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from recsys.models import fused_softmax, layers
from recsys.models.fused_softmax import MASK_VALUE

# Set by the train step (train.logits_chunk): the block of the logits (columns of the fused
# in-batch softmax, or rows with hard negatives) sampled_softmax_loss computes at once when its
# caller does not say.
_ROW_CHUNK: contextvars.ContextVar = contextvars.ContextVar("row_chunk", default=0)


@contextlib.contextmanager
def chunked_logits(rows: int):
    """Within the block, sampled_softmax_loss computes its logits in blocks of about `rows`
    (columns of the fused in-batch softmax, or rows with hard negatives)."""
    token = _ROW_CHUNK.set(rows)
    try:
        yield
    finally:
        _ROW_CHUNK.reset(token)




def _shape(x) -> tuple:
    return tuple(np.shape(x))


def _check_vectors(q_BxD, c_NxD, c_name: str = "c_NxD") -> None:
    """q [B, D] and c [..., D] must share the width D."""
    q, c = _shape(q_BxD), _shape(c_NxD)
    if len(q) != 2 or not c or c[-1] != q[-1]:
        raise ValueError(f"q_BxD {q} and {c_name} {c} must be [B, D] and [..., D] with the same D")


def _check_rows(name: str, x, want: tuple, against: str) -> None:
    if _shape(x) != want:
        raise ValueError(f"{name} {_shape(x)} must be {want} to match {against}")


def in_batch_logits(q_BxD, c_NxD, temperature):
    """Scores of every query against every candidate: [B, N] = q · c / temperature."""
    _check_vectors(q_BxD, c_NxD)
    if len(_shape(c_NxD)) != 2:
        raise ValueError(f"c_NxD {_shape(c_NxD)} must be [N, D] (q_BxD {_shape(q_BxD)})")
    return layers.einsum("bd,nd->bn", q_BxD, c_NxD) / temperature


def logq_correct(logits_BxN, log_q_N):
    """Sampled-softmax correction (Yi et al. 2019): subtract log q(candidate) from each column.

    Candidates that enter the batch as other rows' positives are drawn by popularity, so without
    the correction popular items are over-penalised as negatives.
    """
    _check_rows("log_q_N", log_q_N, _shape(logits_BxN)[1:], f"logits_BxN {_shape(logits_BxN)}")
    return logits_BxN - log_q_N[None, :]


def mask_accidental_hits(logits_BxN, labels_B, query_items_B, candidate_items_N):
    """Masks negatives that are the same item as the row's positive (it would be a false negative)."""
    b, n = _shape(logits_BxN)
    _check_rows("labels_B", labels_B, (b,), f"logits_BxN {(b, n)}")
    _check_rows("query_items_B", query_items_B, (b,), f"logits_BxN {(b, n)}")
    _check_rows("candidate_items_N", candidate_items_N, (n,), f"logits_BxN {(b, n)}")
    same_BxN = query_items_B[:, None] == candidate_items_N[None, :]
    is_label_BxN = jnp.arange(logits_BxN.shape[1])[None, :] == labels_B[:, None]
    return jnp.where(same_BxN & ~is_label_BxN, MASK_VALUE, logits_BxN)


def softmax_cross_entropy(logits_BxN, labels_B, weights_B=None):
    """Mean cross-entropy of the label column per row (weighted rows when weights are given)."""
    logits = _shape(logits_BxN)
    if len(logits) != 2:
        raise ValueError(f"logits_BxN {logits} must be [B, N]")
    _check_rows("labels_B", labels_B, logits[:1], f"logits_BxN {logits}")
    if weights_B is not None:
        _check_rows("weights_B", weights_B, logits[:1], f"logits_BxN {logits}")
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
class NegativeSource:
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
    _check_vectors(q_BxD, c_BxHxD, "c_BxHxD")
    c = _shape(c_BxHxD)
    if len(c) != 3 or c[0] != _shape(q_BxD)[0]:
        raise ValueError(f"c_BxHxD {c} must be [B, H, D] for q_BxD {_shape(q_BxD)}")
    return layers.einsum("bd,bhd->bh", q_BxD, c_BxHxD) / temperature


def mask_positive_and_padding(logits_BxN, item_B, candidate_items, remove_accidental_hits=True):
    """Masks candidates equal to the row's positive (accidental hits) and padding candidates (row 0).

    candidate_items is [N] (shared by every row) or [B, N] (one list per row); none of these
    columns is the label column, so every match is a false negative.
    """
    logits = _shape(logits_BxN)
    if _shape(candidate_items) not in (logits, logits[1:]):
        raise ValueError(f"candidate_items {_shape(candidate_items)} must be [N] or [B, N] to "
                         f"match logits_BxN {logits}")
    _check_rows("item_B", item_B, logits[:1], f"logits_BxN {logits}")
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
    _check_rows("labels_B", labels_B, logits_BxN.shape[:1], f"logits_BxN {_shape(logits_BxN)}")
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


def source_logits(q_BxD, item_B, source: NegativeSource, temperature,
                  remove_accidental_hits=True):
    """Corrected, masked logits of one extra negative source: [B, M] or [B, H]."""
    c, items = _shape(source.c), _shape(source.items)
    if items != c[:-1]:
        raise ValueError(f"negative items {items} must match their vectors {c} without D")
    if source.log_q is not None and _shape(source.log_q) != items:
        raise ValueError(f"negative log_q {_shape(source.log_q)} must match their items {items}")
    if len(c) == 2:
        logits = in_batch_logits(q_BxD, source.c, temperature)
    else:
        logits = per_row_logits(q_BxD, source.c, temperature)
    if source.log_q is not None:
        logits = logits - jnp.broadcast_to(source.log_q, logits.shape)
    return mask_positive_and_padding(logits, item_B, source.items, remove_accidental_hits)


def sampled_softmax_loss(q_BxD, c_BxD, temperature, item_B, *, log_q_B=None,
                         extra: tuple[NegativeSource, ...] = (), hard_negatives: int = 0,
                         remove_accidental_hits=True, row_chunk: int | None = None):
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
      row_chunk: the logits are computed in blocks and recomputed in the backward pass, so
        the whole [B, N] matrix never exists, which at large B saves the memory traffic that
        dominates the step (0 = all at once; None = as `chunked_logits` set, else 0). Without
        hard negatives the in-batch block is walked in blocks of about this many columns
        (recsys.models.fused_softmax); with them, about this many rows at a time (a row's hard
        negatives need its whole row). The result is the same either way.

    Returns:
      The mean cross-entropy over rows.

    Raises:
      ValueError: naming both shapes, when q and c are not both [B, D], item_B or log_q_B is not
        [B], or a source's vectors, items and log q disagree.
    """
    q, c = _shape(q_BxD), _shape(c_BxD)
    if len(q) != 2 or q != c:
        raise ValueError(f"q_BxD {q} and c_BxD {c} must both be [B, D]: row i's positive is c[i]")
    _check_rows("item_B", item_B, q[:1], f"q_BxD {q}")
    if log_q_B is not None:
        _check_rows("log_q_B", log_q_B, q[:1], f"q_BxD {q}")
    for s in extra:  # shapes checked once, before any chunking
        _check_source(q_BxD, s)

    def row_nll(q_RxD, labels_R, item_R, row_extra):
        """Cross-entropy of R rows (labels_R: their columns in the in-batch block)."""
        logits_RxB = in_batch_logits(q_RxD, c_BxD, temperature)
        if log_q_B is not None:
            logits_RxB = logq_correct(logits_RxB, log_q_B)
        if remove_accidental_hits:
            logits_RxB = mask_accidental_hits(logits_RxB, labels_R, item_R, item_B)
        blocks = [logits_RxB] + [source_logits(q_RxD, item_R, s, temperature,
                                               remove_accidental_hits) for s in row_extra]
        logits_RxN = jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else logits_RxB
        logits_RxN = keep_hardest_negatives(logits_RxN, labels_R, hard_negatives)
        log_p_RxN = jax.nn.log_softmax(logits_RxN, axis=-1)
        return -jnp.take_along_axis(log_p_RxN, labels_R[:, None], axis=1)[:, 0]

    b = q_BxD.shape[0]
    row_chunk = _ROW_CHUNK.get() if row_chunk is None else row_chunk
    if hard_negatives <= 0 or hard_negatives >= b + sum(_shape(s.items)[-1] for s in extra) - 1:
        # Every column stays: the in-batch block is one fused log-sum-exp (fused_softmax), in
        # column blocks of row_chunk, and the small extra blocks join it per row.
        return _fused_loss(q_BxD, c_BxD, temperature, item_B, log_q_B, extra,
                           remove_accidental_hits, row_chunk)
    labels_B = jnp.arange(b)
    chunks = fused_softmax.num_blocks(b, row_chunk)
    if chunks == 1:
        return row_nll(q_BxD, labels_B, item_B, extra).mean()
    # Chunk i holds rows i, i + m, i + 2m, ...: a [B] axis split over devices in contiguous
    # blocks stays split the same way inside every chunk, so no chunk gathers rows.
    def split(x):
        return fused_softmax.interleaved_blocks(x, chunks)

    per_row = [i for i, s in enumerate(extra) if s.c.ndim == 3]  # [B, H, D] sources: split too
    rows = (split(q_BxD), split(labels_B), split(item_B),
            [(split(extra[i].c), split(extra[i].items),
              None if extra[i].log_q is None else split(extra[i].log_q)) for i in per_row])

    @jax.checkpoint
    def chunk_nll(args):
        q_RxD, labels_R, item_R, row_parts = args
        row_extra = list(extra)
        for i, (c, items, log_q) in zip(per_row, row_parts):
            row_extra[i] = NegativeSource(c, items, log_q)
        return row_nll(q_RxD, labels_R, item_R, tuple(row_extra))

    return jax.lax.map(chunk_nll, rows).mean()


def _fused_loss(q_BxD, c_BxD, temperature, item_B, log_q_B, extra, remove_accidental_hits,
                block: int):
    """sampled_softmax_loss without hard-negative selection: the in-batch block's log-sum-exp
    from fused_softmax (never the whole [B, B] matrix in the backward pass), the extra sources'
    logits beside it, minus each row's label logit."""
    lse_B = fused_softmax.in_batch_logsumexp(q_BxD, c_BxD, temperature, log_q_B, item_B,
                                             mask_hits=remove_accidental_hits, block=block)
    label_B = layers.einsum("bd,bd->b", q_BxD, c_BxD) / temperature
    if log_q_B is not None:
        label_B = label_B - log_q_B
    if extra:
        blocks = [lse_B[:, None]] + [source_logits(q_BxD, item_B, s, temperature,
                                                   remove_accidental_hits) for s in extra]
        lse_B = jax.nn.logsumexp(jnp.concatenate(blocks, axis=1), axis=1)
    return (lse_B - label_B).mean()


def _check_source(q_BxD, source: NegativeSource) -> None:
    c, items = _shape(source.c), _shape(source.items)
    if items != c[:-1]:
        raise ValueError(f"negative items {items} must match their vectors {c} without D")
    if len(c) == 3 and c[0] != _shape(q_BxD)[0]:
        raise ValueError(f"c_BxHxD {c} must be [B, H, D] for q_BxD {_shape(q_BxD)}")
