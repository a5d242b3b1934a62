"""Stage 1, retrieval: query vectors over padded batch buckets, the ScaNN search, popular items
for cold requests, the extra sources, and deeper searches for requests that filtering leaves short.

Each request's search depth is its own (`depth`): N plus room for its own seen and excluded
items, so one heavy user does not make every request of its batch fetch thousands; a batch is
searched in groups of requests of equal depth, and a request gets the same candidates alone as
in any batch."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from recsys.config import ServeConfig
from recsys.features import TIME_CONTEXT, query_inputs, time_context
from recsys.serve.artifacts import Loaded
from recsys.serve.requests import BATCH_BUCKETS, Request, bucket, pad

REFETCH_GROWTH = 4  # a request that filtering leaves short of k items searches again, 4x deeper,
REFETCH_LIMIT = 64  # up to 64x its first search depth


class Retriever:
    """Candidate rows for a batch of requests: [B, M] item rows, -1 where empty."""

    def __init__(self, loaded: Loaded, cfg: ServeConfig, num_candidates: int, default_time: int):
        self._loaded = loaded
        self._cfg = cfg  # the extra sources' sizes
        self._default_time = default_time  # of the padding rows
        self.num_rows = len(loaded.item_vectors)  # V
        self.num_candidates = num_candidates  # N
        self.history_len = int(loaded.manifest["history_len"])  # L
        self.popular = np.argsort(-loaded.item_logpop[1:], kind="stable") + 1  # rows, most first

    def warmup(self) -> None:
        """Compiles the query tower for every batch bucket."""
        for b in BATCH_BUCKETS:
            self.query_vectors(np.zeros((b, self.history_len), np.int32), np.zeros(b, np.int32))

    def histories(self, reqs: list[Request]) -> np.ndarray:
        """[B, L] item rows: each request's latest L history rows, left-padded with 0."""
        length = self.history_len
        hist_BxL = np.zeros((len(reqs), length), np.int32)
        for i, r in enumerate(reqs):
            h = r.history_rows[-length:]
            if len(h):
                hist_BxL[i, length - len(h):] = h
        return hist_BxL

    def request_vectors(self, reqs: list[Request], hist_BxL: np.ndarray) -> np.ndarray:
        """[B, D] query vectors of validated requests."""
        return self.query_vectors(hist_BxL, np.asarray([r.user_row for r in reqs], np.int32),
                                  np.asarray([r.time for r in reqs]),
                                  np.asarray([r.last_time for r in reqs]))

    def query_vectors(self, hist_BxL, user_B, time_B=None, last_time_B=None) -> np.ndarray:
        """The query tower over a padded bucket; it gets the inputs its export names."""
        a, b = self._loaded, len(user_B)
        size = bucket(b)
        context = None
        if TIME_CONTEXT in a.query_input_names:
            times = np.full(size, self._default_time, np.int64)
            last = np.full(size, -1, np.int64)
            if time_B is not None:
                times[:b], last[:b] = time_B, last_time_B
            context = time_context(times, last)
        inputs = query_inputs(a.user_features, pad(np.asarray(user_B, np.int32), size),
                              pad(np.asarray(hist_BxL, np.int32), size), context)
        return np.asarray(a.query_fn(a.query_params, inputs))[:b]

    def depth(self, r: Request) -> int:
        """R' of one request: N plus room for what filtering drops of its own seen and excluded
        items, that room rounded up to a power of two (so a batch has few distinct depths)."""
        extra = len(r.seen_rows) + len(r.exclude_rows)
        room = 0 if extra == 0 else 1 << (extra - 1).bit_length()
        return min(self.num_candidates + room, self.num_rows - 1)

    def search(self, reqs: list[Request], q_BxD, hist_BxL,
               depth_B: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each request's own top-`depth_B[i]` (`retrieve`), one search per group of equal
        depth: [(indices into reqs, their candidate rows [b, M])]."""
        groups = []
        for fetch in np.unique(depth_B):
            idx = np.flatnonzero(depth_B == fetch)
            groups.append((idx, self.retrieve([reqs[i] for i in idx], q_BxD[idx], hist_BxL[idx],
                                              int(fetch))))
        return groups

    def first_allowed(self, reqs: list[Request], groups: list[tuple[np.ndarray, np.ndarray]],
                      first_allowed: Callable[[list[Request], np.ndarray], np.ndarray],
                      ) -> np.ndarray:
        """[B, N] rows: stage 2's rule, first_allowed(reqs, cand_BxM), over each group of
        `search`."""
        cand_BxN = np.full((len(reqs), self.num_candidates), -1, np.int64)
        for idx, cand_bxM in groups:
            cand_BxN[idx] = first_allowed([reqs[i] for i in idx], cand_bxM)
        return cand_BxN

    def retrieve(self, reqs: list[Request], q_BxD, hist_BxL, fetch: int) -> np.ndarray:
        """ScaNN top-`fetch`, popular items for cold requests, and the extra sources, merged
        without duplicates: [B, M] rows."""
        _, rows_BxR = self._loaded.searcher.search(q_BxD, fetch)
        rows_BxR = np.asarray(rows_BxR, np.int64)
        for i, r in enumerate(reqs):
            if r.cold:  # no user, no history: popular items instead of an uninformed query
                rows_BxR[i] = self.popular[:fetch]
        sources = self._extra_sources(reqs, hist_BxL)
        if sources is not None:
            # Extra sources take their slots from the tail of the main list.
            head = max(self.num_candidates - sources.shape[1], 0)
            rows_BxR = np.concatenate([rows_BxR[:, :head], sources, rows_BxR[:, head:]], axis=1)
        return _dedupe(rows_BxR, self.num_rows)

    def refetch(self, reqs: list[Request], q_BxD, hist_BxL, cand_BxN: np.ndarray,
                depth_B: np.ndarray,
                first_allowed: Callable[[list[Request], np.ndarray], np.ndarray]) -> np.ndarray:
        """Requests with fewer than k allowed candidates in cand_BxN search again, each 4x deeper
        than its last search, until they have them or reach 64x their first depth (attribute
        filters can ban most of a user's neighbourhood)."""
        wanted_B = np.minimum([r.k for r in reqs], self.num_candidates)
        limit_B = np.minimum(depth_B * REFETCH_LIMIT, self.num_rows - 1)
        fetch_B = np.array(depth_B, np.int64)

        def short() -> np.ndarray:
            return np.flatnonzero((fetch_B < limit_B) & ((cand_BxN > 0).sum(1) < wanted_B))

        todo = short()
        while len(todo):
            fetch_B[todo] = np.minimum(fetch_B[todo] * REFETCH_GROWTH, limit_B[todo])
            sub = [reqs[i] for i in todo]
            groups = self.search(sub, q_BxD[todo], hist_BxL[todo], fetch_B[todo])
            cand_BxN[todo] = self.first_allowed(sub, groups, first_allowed)
            todo = short()
        return cand_BxN

    def _extra_sources(self, reqs: list[Request], hist_BxL: np.ndarray) -> np.ndarray | None:
        """Nearest items of each request's latest items, then the most popular items."""
        parts = []
        m, j = self._cfg.recent_items, self._cfg.neighbours_per_item
        if m > 0 and j > 0:
            recent_BxM = hist_BxL[:, -m:]
            vectors = self._loaded.item_vectors[recent_BxM.ravel()]
            _, near = self._loaded.searcher.search(vectors, j + 1)
            near = np.asarray(near, np.int64).reshape(len(reqs), m, j + 1)
            near = np.where(recent_BxM[:, :, None] > 0, near, -1)
            # Neighbour rank first, then recency: each recent item's best neighbours come first.
            parts.append(near[:, ::-1, 1:].transpose(0, 2, 1).reshape(len(reqs), -1))
        if self._cfg.popular_candidates > 0:
            top = self.popular[:self._cfg.popular_candidates]
            parts.append(np.broadcast_to(top, (len(reqs), len(top))))
        return np.concatenate(parts, axis=1) if parts else None


def _dedupe(cand_BxM: np.ndarray, num_rows: int) -> np.ndarray:
    """Later repeats of a row within each request's list become -1 (first occurrence kept)."""
    b, m = cand_BxM.shape
    keys = (np.arange(b)[:, None] * (num_rows + 1) + cand_BxM + 1).ravel()
    _, first = np.unique(keys, return_index=True)
    keep = np.zeros(b * m, bool)
    keep[first] = True
    return np.where(keep.reshape(b, m), cand_BxM, -1)
