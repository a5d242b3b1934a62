"""Stage 3, scoring: the ranker over each request's candidates, padded to a batch bucket (the
retrieval dot products when the artifacts have no ranker)."""

from __future__ import annotations

import numpy as np

from recsys.features import zeros_from_spec
from recsys.models.ranker_inputs import input_spec, ranker_inputs
from recsys.serve import artifacts
from recsys.serve.requests import BATCH_BUCKETS, Request, bucket, pad


class Scorer:
    """Scores [B, N] candidate rows; -inf where a slot is empty (-1)."""

    def __init__(self, loaded: artifacts.Loaded, num_candidates: int):
        self._loaded = loaded
        self._n = num_candidates
        self.tables = artifacts.ranker_tables(loaded)
        history_len = int(loaded.manifest["history_len"])
        self._spec = input_spec(loaded.item_vectors.shape[1], loaded.item_genres.shape[1],
                                loaded.user_features.shape[1], history_len)

    @property
    def default_time(self) -> int:
        """The latest stored event time: the request time when a request gives none."""
        return self.tables.timeline.last_time

    def warmup(self) -> None:
        """Compiles the ranker for every batch bucket, on zero inputs of the fixed shapes."""
        if self._loaded.ranker_fn is None:
            return
        for b in BATCH_BUCKETS:
            self._ranker(self._zero_inputs(b))

    def score(self, reqs: list[Request], q_BxD, hist_BxL, cand_BxN) -> np.ndarray:
        """[B, N] float scores of the candidates (-inf for empty slots)."""
        valid_BxN = cand_BxN > 0
        rows_BxN = np.maximum(cand_BxN, 0)
        if self._loaded.ranker_fn is None:
            scores = np.einsum("bd,bnd->bn", q_BxD, self._loaded.item_vectors[rows_BxN])
            return np.where(valid_BxN, scores, -np.inf)
        b = len(reqs)
        size = bucket(b)
        inputs = ranker_inputs(
            self.tables, pad(q_BxD, size), pad(np.asarray([r.user_row for r in reqs], np.int32),
                                               size),
            pad(hist_BxL, size), pad(np.asarray([r.time for r in reqs], np.int64), size),
            pad(np.asarray([r.last_time for r in reqs], np.int64), size, -1),
            pad(rows_BxN, size))
        scores = self._ranker(inputs)[:b]
        return np.where(valid_BxN, scores, -np.inf)

    def _ranker(self, inputs: dict) -> np.ndarray:
        typed = {k: np.asarray(inputs[k], dtype) for k, (dtype, _) in self._spec.items()}
        return np.asarray(self._loaded.ranker_fn(self._loaded.ranker_params, typed))

    def _zero_inputs(self, b: int) -> dict:
        return zeros_from_spec(self._spec, b, self._n)
