"""Exact full-catalogue ranking by inner product, chunked over items: target ranks and top-k."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
_MAX_CHUNK = 1 << 24  # counts are summed in float32, exact up to 2**24


def target_ranks(q_QxD, items_NxD, targets_Q, exclude_offsets=None, exclude_items=None,
                 item_chunk: int = 65536, query_block: int = 1024) -> np.ndarray:
    """0-based rank of each query's target among the valid items, by inner product.

    rank = number of valid items other than the target whose score is >= the target's
    score (ties count against the target), not counting the query's excluded items. Row 0
    is padding and never counts. Scores are float32 matmuls at HIGHEST precision; the
    target's score comes from the same matmul as the items it is compared with, so an item
    with the same vector as the target always ties with it.

    Args:
      q_QxD: query vectors.
      items_NxD: item vectors; row 0 is padding, items are rows 1..N-1.
      targets_Q: target row per query, in 1..N-1.
      exclude_offsets: [Q+1] CSR offsets, or None for no exclusions.
      exclude_items: [E] item rows; query i excludes
        exclude_items[exclude_offsets[i]:exclude_offsets[i+1]]. Duplicates, row 0 and the
        target itself are allowed (the target is never excluded from its own ranking).
      item_chunk: most items scored at once.
      query_block: most queries scored at once (memory is about query_block * item_chunk * 4 B).

    Returns:
      ranks_Q: int64 numpy array.
    """
    q_QxD, items_NxD = _check_vectors(q_QxD, items_NxD)
    num_q, n = q_QxD.shape[0], items_NxD.shape[0]
    targets_Q = np.asarray(targets_Q, np.int64)
    if targets_Q.shape != (num_q,):
        raise ValueError(f"targets_Q has shape {targets_Q.shape}; q_QxD has {num_q} rows")
    if num_q and (targets_Q.min() < 1 or targets_Q.max() >= n):
        raise ValueError(f"targets_Q must be item rows in 1..{n - 1} (items_NxD has {n} rows), "
                         f"got range {targets_Q.min()}..{targets_Q.max()}")
    ex_q, ex_item = _exclusion_pairs(exclude_offsets, exclude_items, num_q, n)
    # Excluding the target or row 0 would subtract what was never counted.
    keep = (ex_item != targets_Q[ex_q]) & (ex_item != 0)
    ex_q, ex_item = ex_q[keep], ex_item[keep]
    num_chunks, chunk = _split(n, min(item_chunk, _MAX_CHUNK))
    items = jnp.asarray(items_NxD)
    ranks_Q = np.zeros(num_q, np.int64)
    for lo, hi, block, ex_q_E, ex_item_E in _query_blocks(num_q, query_block, ex_q, ex_item):
        counts_B = _rank_block(_pad_rows(q_QxD[lo:hi], block), items,
                               _pad_rows(targets_Q[lo:hi].astype(np.int32), block, fill=1), ex_q_E, ex_item_E,
                               chunk=chunk, num_chunks=num_chunks)
        ranks_Q[lo:hi] = np.asarray(counts_B)[:hi - lo]
    return ranks_Q


def exact_topk(q_QxD, items_NxD, k: int, exclude_offsets=None, exclude_items=None,
               item_chunk: int = 65536, query_block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k items per query by inner product, never returning row 0 or excluded items.

    Chunked over items with a running merge. Equal scores are ordered by row, lowest first.

    Args:
      q_QxD: query vectors.
      items_NxD: item vectors; row 0 is padding, items are rows 1..N-1.
      k: items returned per query, 1 <= k <= N-1.
      exclude_offsets, exclude_items: optional CSR exclusions, as in `target_ranks`.
      item_chunk: most items scored at once.
      query_block: most queries scored at once.

    Returns:
      scores_QxK: float32, descending; -inf where fewer than k items were left.
      rows_QxK: int64 item rows; -1 where the score is -inf.
    """
    q_QxD, items_NxD = _check_vectors(q_QxD, items_NxD)
    num_q, n = q_QxD.shape[0], items_NxD.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k={k} must be in 1..{n - 1} (items_NxD has {n} rows, row 0 is padding)")
    ex_q, ex_item = _exclusion_pairs(exclude_offsets, exclude_items, num_q, n)
    num_chunks, chunk = _split(n, item_chunk)
    items = jnp.asarray(items_NxD)
    scores_QxK = np.zeros((num_q, k), np.float32)
    rows_QxK = np.zeros((num_q, k), np.int64)
    for lo, hi, block, ex_q_E, ex_item_E in _query_blocks(num_q, query_block, ex_q, ex_item):
        s_BxK, r_BxK = _topk_block(_pad_rows(q_QxD[lo:hi], block), items, ex_q_E, ex_item_E,
                                   k=k, chunk=chunk, num_chunks=num_chunks)
        scores_QxK[lo:hi] = np.asarray(s_BxK)[:hi - lo]
        rows_QxK[lo:hi] = np.asarray(r_BxK)[:hi - lo]
    return scores_QxK, rows_QxK


def _chunk_bounds(c, chunk: int, n: int):
    """Chunk c covers rows [lo, lo + chunk); the last slice starts early to keep its shape."""
    lo = c * chunk
    return lo, jnp.minimum(lo, n - chunk)


@functools.partial(jax.jit, static_argnames=("chunk", "num_chunks"))
def _rank_block(q_BxD, items_NxD, targets_B, ex_q_E, ex_item_E, *, chunk, num_chunks):
    """Per query, valid non-excluded items scoring >= the target; int32 [B]."""
    n, b = items_NxD.shape[0], q_BxD.shape[0]
    tgt_BxD = items_NxD[targets_B]

    def body(c, count_B):
        lo, start = _chunk_bounds(c, chunk, n)
        chunk_CxD = jax.lax.dynamic_slice_in_dim(items_NxD, start, chunk)
        # Target vectors ride in the same matmul so their scores round like the chunk's.
        both_BxCB = jnp.matmul(q_BxD, jnp.concatenate([chunk_CxD, tgt_BxD]).T, precision=_HIGHEST)
        scores_BxC, t_B = both_BxCB[:, :chunk], jnp.diagonal(both_BxCB[:, chunk:])
        rows_C = start + jnp.arange(chunk)
        counted_BxC = ((rows_C >= lo) & (rows_C > 0) & (rows_C != targets_B[:, None])
                       & (scores_BxC >= t_B[:, None]))
        # Excluded items are read back from this very matrix, so what was counted is undone.
        in_chunk_E = (ex_item_E >= lo) & (ex_item_E < lo + chunk)
        ex_scores_E = scores_BxC[ex_q_E, jnp.clip(ex_item_E - start, 0, chunk - 1)]
        ex_hit_E = (in_chunk_E & (ex_scores_E >= t_B[ex_q_E])).astype(jnp.int32)
        # An f32 sum of 0/1 reduces about twice as fast as int32 on CPU; exact below 2**24.
        return (count_B + counted_BxC.astype(jnp.float32).sum(1).astype(jnp.int32)
                - jax.ops.segment_sum(ex_hit_E, ex_q_E, num_segments=b))

    return jax.lax.fori_loop(0, num_chunks, body, jnp.zeros(b, jnp.int32))


@functools.partial(jax.jit, static_argnames=("k", "chunk", "num_chunks"))
def _topk_block(q_BxD, items_NxD, ex_q_E, ex_item_E, *, k, chunk, num_chunks):
    """Running top-k over item chunks; ([B, K] scores, [B, K] rows with -1 for -inf)."""
    n = items_NxD.shape[0]

    def chunk_topk(c):
        lo, start = _chunk_bounds(c, chunk, n)
        chunk_CxD = jax.lax.dynamic_slice_in_dim(items_NxD, start, chunk)
        scores_BxC = jnp.matmul(q_BxD, chunk_CxD.T, precision=_HIGHEST)
        rows_C = start + jnp.arange(chunk)
        scores_BxC = jnp.where((rows_C >= lo) & (rows_C > 0), scores_BxC, -jnp.inf)
        in_chunk_E = (ex_item_E >= lo) & (ex_item_E < lo + chunk)
        col_E = jnp.where(in_chunk_E, ex_item_E - start, chunk)  # out of range: dropped
        scores_BxC = scores_BxC.at[ex_q_E, col_E].set(-jnp.inf, mode="drop")
        top_BxT, idx_BxT = jax.lax.top_k(scores_BxC, min(k, chunk))
        return top_BxT, (start + idx_BxT).astype(jnp.int32)

    def body(c, carry):
        best_BxK, rows_BxK = carry
        top_BxT, rows_BxT = chunk_topk(c)
        # Earlier chunks come first, and top_k keeps the lower index among equals.
        merged_s = jnp.concatenate([best_BxK, top_BxT], axis=1)
        merged_r = jnp.concatenate([rows_BxK, rows_BxT], axis=1)
        best_BxK, pick_BxK = jax.lax.top_k(merged_s, k)
        return best_BxK, jnp.take_along_axis(merged_r, pick_BxK, axis=1)

    # The first chunk starts the running list itself (k <= n - 1 <= chunk when it is the only
    # one): merging it into an all -inf list would cost a second top-k of every query.
    first_s, first_r = chunk_topk(0)
    if first_s.shape[1] < k:  # a chunk shorter than k: pad with -inf, as the merge would
        pad = k - first_s.shape[1]
        first_s = jnp.pad(first_s, ((0, 0), (0, pad)), constant_values=-jnp.inf)
        first_r = jnp.pad(first_r, ((0, 0), (0, pad)), constant_values=-1)
    best_BxK, rows_BxK = jax.lax.fori_loop(1, num_chunks, body, (first_s, first_r))
    return best_BxK, jnp.where(best_BxK == -jnp.inf, -1, rows_BxK)


def _check_vectors(q_QxD, items_NxD) -> tuple[np.ndarray, np.ndarray]:
    q_QxD, items_NxD = np.asarray(q_QxD, np.float32), np.asarray(items_NxD, np.float32)
    if q_QxD.ndim != 2 or items_NxD.ndim != 2 or q_QxD.shape[1] != items_NxD.shape[1]:
        raise ValueError(f"q_QxD {q_QxD.shape} and items_NxD {items_NxD.shape} must be [Q, D] "
                         "and [N, D] with the same D")
    if items_NxD.shape[0] < 2:
        raise ValueError(f"items_NxD has {items_NxD.shape[0]} rows; need row 0 (padding) and items")
    return q_QxD, items_NxD


def _exclusion_pairs(offsets, items, num_q: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR exclusions -> unique (query, item) pairs sorted by query then item; int64 [E] each."""
    if offsets is None and items is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if offsets is None or items is None:
        raise ValueError("pass both exclude_offsets and exclude_items, or neither")
    offsets, items = np.asarray(offsets, np.int64), np.asarray(items, np.int64)
    if (offsets.shape != (num_q + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0)
            or items.ndim != 1 or offsets[-1] != items.shape[0]):
        raise ValueError(f"exclude_offsets (shape {offsets.shape}) must be [Q+1] = [{num_q + 1}] "
                         f"non-decreasing from 0 to len(exclude_items) = {items.shape}")
    if items.size and (items.min() < 0 or items.max() >= n):
        raise ValueError(f"exclude_items must be item rows in 0..{n - 1}, "
                         f"got range {items.min()}..{items.max()}")
    key = np.unique(np.repeat(np.arange(num_q, dtype=np.int64), np.diff(offsets)) * n + items)
    return key // n, key % n


def _split(total: int, most: int) -> tuple[int, int]:
    """(pieces, size): the fewest equal pieces of at most `most` covering `total`."""
    if most < 1:
        raise ValueError(f"chunk and block sizes must be positive, got {most}")
    pieces = max(-(-total // most), 1)
    return pieces, max(-(-total // pieces), 1)


def _query_blocks(num_q: int, query_block: int, ex_q: np.ndarray, ex_item: np.ndarray):
    """Yields (lo, hi, block, ex_q_E, ex_item_E) with block-local, equally padded pairs."""
    num_blocks, block = _split(num_q, query_block)
    bounds = np.searchsorted(ex_q, np.arange(num_blocks + 1) * block)
    # One padded length per call keeps one compiled shape for every block.
    pad = 1 << int(max(np.diff(bounds).max(initial=0), 1) - 1).bit_length()
    for i in range(num_blocks):
        lo, hi = i * block, min((i + 1) * block, num_q)
        if lo >= hi:
            break
        sel = slice(bounds[i], bounds[i + 1])
        ex_q_E = _pad_rows((ex_q[sel] - lo).astype(np.int32), pad, fill=0)
        ex_item_E = _pad_rows(ex_item[sel].astype(np.int32), pad, fill=-1)
        yield lo, hi, block, ex_q_E, ex_item_E


def _pad_rows(x: np.ndarray, rows: int, fill=0) -> np.ndarray:
    """Pads axis 0 of x to `rows` with `fill`."""
    out = np.full((rows,) + x.shape[1:], fill, x.dtype)
    out[:x.shape[0]] = x
    return out


def sharded_topk(q_QxD, items_NxD, k: int, mesh: jax.sharding.Mesh, item_chunk: int = 65536,
                 query_block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with the item rows split over every device of `mesh`.

    Each device keeps N / S rows (S = mesh.size), finds its own top-k per query chunk by chunk,
    and the S candidate lists are all-gathered and merged, so no device ever holds the whole
    catalogue or all the scores: the exact search of ground truth and of the index fallback on
    any mesh, CPU, GPU or TPU, also where ScaNN's build is unavailable. Same contract as
    `exact_topk` without exclusions (row 0 never returned; equal scores lowest row first).
    """
    q_QxD, items_NxD = _check_vectors(q_QxD, items_NxD)
    num_q, n = q_QxD.shape[0], items_NxD.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k={k} must be in 1..{n - 1} (items_NxD has {n} rows, row 0 is padding)")
    axes = tuple(mesh.axis_names)
    shards = mesh.size
    per_shard = -(-n // shards)
    num_chunks, chunk = _split(per_shard, item_chunk)
    per_shard = num_chunks * chunk  # every shard scans whole chunks
    padded = np.zeros((per_shard * shards, items_NxD.shape[1]), np.float32)
    padded[:n] = items_NxD
    items = jax.device_put(padded, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes)))
    search = _sharded_search(mesh, axes, n, min(k, per_shard), k, chunk, num_chunks)
    num_blocks, block = _split(num_q, query_block)
    scores_QxK = np.zeros((num_q, k), np.float32)
    rows_QxK = np.zeros((num_q, k), np.int64)
    for i in range(num_blocks):
        lo, hi = i * block, min((i + 1) * block, num_q)
        s_BxK, r_BxK = search(_pad_rows(q_QxD[lo:hi], block), items)
        scores_QxK[lo:hi] = np.asarray(s_BxK)[:hi - lo]
        rows_QxK[lo:hi] = np.asarray(r_BxK)[:hi - lo]
    return scores_QxK, rows_QxK


@functools.cache
def _sharded_search(mesh, axes, n: int, local_k: int, k: int, chunk: int, num_chunks: int):
    """jit(shard_map(per-shard running top-k, then all-gather and merge)) for one shape."""
    P = jax.sharding.PartitionSpec

    def per_shard(q_BxD, items_LxD):
        offset = jax.lax.axis_index(axes) * items_LxD.shape[0]
        b = q_BxD.shape[0]

        def body(c, carry):
            best_BxK, rows_BxK = carry
            start = c * chunk
            chunk_CxD = jax.lax.dynamic_slice_in_dim(items_LxD, start, chunk)
            scores_BxC = jnp.matmul(q_BxD, chunk_CxD.T, precision=_HIGHEST)
            rows_C = offset + start + jnp.arange(chunk)
            scores_BxC = jnp.where((rows_C > 0) & (rows_C < n), scores_BxC, -jnp.inf)
            top_BxT, idx_BxT = jax.lax.top_k(scores_BxC, min(local_k, chunk))
            merged_s = jnp.concatenate([best_BxK, top_BxT], axis=1)
            merged_r = jnp.concatenate([rows_BxK, (offset + start + idx_BxT).astype(jnp.int32)], 1)
            best_BxK, pick_BxK = jax.lax.top_k(merged_s, local_k)
            return best_BxK, jnp.take_along_axis(merged_r, pick_BxK, axis=1)

        init = (jnp.full((b, local_k), -jnp.inf, jnp.float32),
                jnp.full((b, local_k), -1, jnp.int32))
        best_BxK, rows_BxK = jax.lax.fori_loop(0, num_chunks, body, init)
        # [S, B, K] from every shard, in shard order (lower rows first: ties stay by row).
        all_s = jax.lax.all_gather(best_BxK, axes, tiled=False)
        all_r = jax.lax.all_gather(rows_BxK, axes, tiled=False)
        all_s = jnp.moveaxis(all_s, 0, 1).reshape(b, -1)
        all_r = jnp.moveaxis(all_r, 0, 1).reshape(b, -1)
        top_BxK, pick_BxK = jax.lax.top_k(all_s, k)
        rows_BxK = jnp.take_along_axis(all_r, pick_BxK, axis=1)
        return top_BxK, jnp.where(top_BxK == -jnp.inf, -1, rows_BxK)

    # shard_map because the merge must see each shard's own candidates: left to the compiler,
    # a top-k over a row-sharded score matrix gathers the whole [B, N] scores first.
    fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(axes)), out_specs=(P(), P()),
                       check_vma=False)
    return jax.jit(fn)
