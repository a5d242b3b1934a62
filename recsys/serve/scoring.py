"""Stage 3, scoring: the ranker over each request's candidates, padded to a batch bucket (the
retrieval dot products when the artifacts have no ranker).

The ranker's inputs are computed inside the same jitted call as the ranker, from tables placed
on the device once per loaded version (recsys.models.ranker_inputs.device_ranker_inputs): a
call carries only the requests' query vectors, user and history rows, times and candidate rows.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from recsys.models.ranker_inputs import device_ranker_inputs, device_tables, split_time
from recsys.serve import artifacts
from recsys.serve.requests import BATCH_BUCKETS, Request, bucket, pad


class Scorer:
    """Scores [B, N] candidate rows; -inf where a slot is empty (-1)."""

    def __init__(self, loaded: artifacts.Loaded, num_candidates: int):
        self._loaded = loaded
        self._n = num_candidates
        times = loaded.history_times
        self.default_time = int(times.max()) if len(times) else 0  # the latest stored event
        self.device_tables, self.layout, self._score = None, None, None
        if loaded.ranker_fn is not None:
            arrays, self.layout = device_tables(artifacts.ranker_tables(loaded))
            self.device_tables = {k: jax.device_put(v) for k, v in arrays.items()}
            self._score = jax.jit(functools.partial(_score, loaded.ranker_fn, self.layout))

    def warmup(self) -> None:
        """Compiles the ranker for every batch bucket, on zero inputs of the fixed shapes."""
        if self._score is None:
            return
        a = self._loaded
        length, dim = int(a.manifest["history_len"]), a.item_vectors.shape[1]
        for b in BATCH_BUCKETS:
            self._call(np.zeros((b, dim), np.float32), np.zeros(b, np.int32),
                       np.zeros((b, length), np.int32), np.zeros(b, np.int64),
                       np.full(b, -1, np.int64), np.zeros((b, self._n), np.int32))

    def score(self, reqs: list[Request], q_BxD, hist_BxL, cand_BxN) -> np.ndarray:
        """[B, N] float scores of the candidates (-inf for empty slots)."""
        valid_BxN = cand_BxN > 0
        rows_BxN = np.maximum(cand_BxN, 0)
        if self._score is None:
            scores = np.einsum("bd,bnd->bn", q_BxD, self._loaded.item_vectors[rows_BxN])
            return np.where(valid_BxN, scores, -np.inf)
        b = len(reqs)
        size = bucket(b)
        scores = self._call(
            pad(np.asarray(q_BxD, np.float32), size),
            pad(np.asarray([r.user_row for r in reqs], np.int32), size), pad(hist_BxL, size),
            pad(np.asarray([r.time for r in reqs], np.int64), size),
            pad(np.asarray([r.last_time for r in reqs], np.int64), size, -1),
            pad(rows_BxN.astype(np.int32), size))[:b]
        return np.where(valid_BxN, scores, -np.inf)

    def _call(self, q_BxD, user_B, hist_BxL, time_B, last_time_B, cand_BxN) -> np.ndarray:
        """The jitted ranker on one padded bucket; times in Unix seconds (int64)."""
        return np.asarray(self._score(self._loaded.ranker_params, self.device_tables, q_BxD,
                                      user_B, np.asarray(hist_BxL, np.int32), split_time(time_B),
                                      split_time(last_time_B), cand_BxN))


def _score(ranker_fn, layout, params, tables, q_BxD, user_B, history_BxL, time_Bx2,
           last_time_Bx2, cand_BxN):
    """Scores [B, N] of the exported ranker on inputs computed in the same jitted call."""
    inputs = device_ranker_inputs(tables, layout, q_BxD, user_B, history_BxL, time_Bx2,
                                  last_time_Bx2, cand_BxN)
    return ranker_fn(params, inputs)
