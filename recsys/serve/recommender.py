"""`Recommender`: the four stages per request — retrieve, filter, score, order — with timings."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np

from recsys.config import ServeConfig
from recsys.models.ranker_inputs import input_spec, ranker_inputs
from recsys.serve import artifacts, filtering, ordering
from recsys.serve.requests import (
    FIELDS,
    Policy,
    Request,
    RequestError,
    check_id,
    id_list,
    number,
    parse_filters,
    parse_policy,
    positive_int,
)

BATCH_BUCKETS = (1, 8, 64, 256)  # request batches are padded to these sizes: no recompiles
REFETCH_GROWTH = 4  # a request that filtering leaves short of k items searches again, 4x deeper,
REFETCH_LIMIT = 64  # up to 64x its first search depth
STAGES = ("retrieval", "filtering", "scoring", "ordering")


@dataclasses.dataclass
class Recommendation:
    items: list  # raw item ids, in serving order
    scores: list[float]  # ranker scores (retrieval scores when there is no ranker)
    timings: dict[str, float]  # milliseconds per stage and in total (of the whole batch)
    unknown_ids: list = dataclasses.field(default_factory=list)  # request ids not in the vocabularies
    cold_start: bool = False  # True when neither a known user nor a known history was given
    titles: list[str] | None = None


class Recommender:
    """Serves recommendations from an artifacts directory (see recsys.export, docs/serving.md).

    Thread-safe: requests share only read-only arrays, compiled functions and the availability
    mask, which `set_available` replaces atomically.
    """

    def __init__(self, loaded: artifacts.Loaded, cfg: ServeConfig | None = None):
        self.a = loaded
        self.cfg = cfg or ServeConfig()
        self.num_candidates = min(self.cfg.num_candidates, len(loaded.item_vectors) - 1)
        self.history_len = int(loaded.manifest["history_len"])
        self.genre_names = tuple(loaded.manifest.get("genre_names", ()))
        self.tables = artifacts.ranker_tables(loaded)
        self.default_time = self.tables.timeline.last_time
        offsets = loaded.history_offsets
        has = np.diff(offsets) > 0
        self._last_time_U = np.full(len(offsets) - 1, -1, np.int64)
        self._last_time_U[has] = loaded.history_times[offsets[1:][has] - 1]
        self._popular = np.argsort(-loaded.item_logpop[1:], kind="stable") + 1
        self.availability = filtering.Availability(len(loaded.item_vectors))
        self._defaults = Policy(self.cfg.ordering, self.cfg.mmr_lambda, self.cfg.genre_cap,
                                self.cfg.explore_temperature, 0)
        self._filters = parse_filters(json.loads(self.cfg.filters) if self.cfg.filters else None,
                                      self.genre_names)
        d, g = loaded.item_vectors.shape[1], loaded.item_genres.shape[1]
        self._spec = input_spec(d, g, loaded.user_features.shape[1], self.history_len)

    @classmethod
    def load(cls, directory: str | pathlib.Path, warmup: bool = True, **overrides) -> Recommender:
        """Loads and verifies artifacts, then (by default) compiles every batch bucket.

        overrides: ServeConfig fields replacing the artifacts' own serve config.
        """
        loaded = artifacts.load(directory)
        stored = loaded.manifest["config"].get("serve", {})
        known = {f.name for f in dataclasses.fields(ServeConfig)}
        bad = set(overrides) - known
        if bad:
            raise TypeError(f"unknown ServeConfig field(s): {sorted(bad)}")
        cfg = ServeConfig(**{**{k: v for k, v in stored.items() if k in known}, **overrides})
        rec = cls(loaded, cfg)
        if warmup:
            rec.warmup()
        return rec

    def warmup(self) -> None:
        """Compiles the query tower and ranker for every batch bucket (fixed candidate count)."""
        for b in BATCH_BUCKETS:
            self._query_vectors(np.zeros((b, self.history_len), np.int32), np.zeros(b, np.int32))
            if self.a.ranker_fn is not None:
                self._ranker(self._zeros_inputs(b))

    def set_available(self, item_ids, available: bool) -> list:
        """Marks raw item ids (un)available for every later request; returns the unknown ids."""
        ids = id_list("item_ids", item_ids)
        rows = self.a.items.lookup(ids) if ids else np.zeros(0, np.int32)
        self.availability.set(rows[rows > 0], bool(available))
        return [i for i, r in zip(ids, rows) if r == 0]

    # ---- public API -------------------------------------------------------------------------

    def recommend(self, user_id=None, history=None, k: int = 10, **options) -> Recommendation:
        """Top-k items for a known user (raw id) and/or a history of raw item ids.

        options: exclude, exclude_seen, filters, time, ordering, mmr_lambda, genre_cap,
        temperature, seed (docs/serving.md).
        """
        return self.recommend_batch([dict(user_id=user_id, history=history, k=k, **options)])[0]

    def recommend_batch(self, requests: list[dict]) -> list[Recommendation]:
        """Runs many requests through each stage together (one tower call, one index search,
        one ranker call per bucket of up to BATCH_BUCKETS[-1] requests)."""
        if not isinstance(requests, (list, tuple)):
            raise RequestError("requests", f"expected a list of dicts, got {type(requests).__name__}")
        t0 = time.perf_counter()
        reqs = [self._parse(r) for r in requests]
        out = []
        for lo in range(0, len(reqs), BATCH_BUCKETS[-1]):
            out += self._run(reqs[lo:lo + BATCH_BUCKETS[-1]], t0)
            t0 = time.perf_counter()
        return out

    def _run(self, reqs: list[Request], t0: float) -> list[Recommendation]:
        marks = [time.perf_counter()]
        hist_BxL = self._histories(reqs)
        q_BxD = self._query_vectors(hist_BxL, np.asarray([r.user_row for r in reqs], np.int32),
                                    np.asarray([r.time for r in reqs]),
                                    np.asarray([r.last_time for r in reqs]))
        extra = max(len(r.seen_rows) + len(r.exclude_rows) for r in reqs)
        fetch = min(self.num_candidates + extra, len(self.a.item_vectors) - 1)
        cand_BxM = self._retrieve(reqs, q_BxD, hist_BxL, fetch)
        marks.append(time.perf_counter())
        cand_BxN = self._filter(reqs, q_BxD, hist_BxL, cand_BxM, fetch)
        marks.append(time.perf_counter())
        score_BxN = self._score(reqs, q_BxD, hist_BxL, cand_BxN)
        marks.append(time.perf_counter())
        out = self._order(reqs, cand_BxN, score_BxN)
        marks.append(time.perf_counter())
        timings = {s: (marks[i + 1] - marks[i]) * 1e3 for i, s in enumerate(STAGES)}
        timings["total"] = (marks[-1] - t0) * 1e3
        for rec in out:
            rec.timings = dict(timings)
        return out

    # ---- request parsing --------------------------------------------------------------------

    def _parse(self, r) -> Request:
        if not isinstance(r, dict):
            raise RequestError("requests", f"each request must be a dict, got {type(r).__name__}")
        unknown_keys = sorted(set(r) - set(FIELDS))
        if unknown_keys:
            raise RequestError(unknown_keys[0], f"unknown request field; known: {', '.join(FIELDS)}")
        k = positive_int("k", r.get("k", 10))
        user_id, unknown, user_row = r.get("user_id"), [], 0
        if user_id is not None:
            check_id("user_id", user_id)
            user_row = int(self.a.users.lookup([user_id])[0])
            if user_row == 0:
                unknown.append(user_id)
        offsets = self.a.history_offsets
        stored = self.a.history_items[offsets[user_row]:offsets[user_row + 1]]
        history = r.get("history")
        if history is not None:
            history = id_list("history", history)
            rows = self.a.items.lookup(history) if history else np.zeros(0, np.int32)
            unknown += [h for h, row in zip(history, rows) if row == 0]
            history_rows = rows[rows > 0]
            last_time = -1 if len(history_rows) else self._last_time_U[user_row]
        else:
            history_rows, last_time = stored, self._last_time_U[user_row]
        exclude = id_list("exclude", r.get("exclude"))
        exclude_rows = self.a.items.lookup(exclude) if exclude else np.zeros(0, np.int32)
        exclude_seen = r.get("exclude_seen")
        if exclude_seen is None:
            exclude_seen = self.cfg.exclude_seen
        if not isinstance(exclude_seen, (bool, np.bool_)):
            raise RequestError("exclude_seen", f"must be a bool, got {exclude_seen!r}")
        seen = np.union1d(stored, history_rows) if exclude_seen else np.zeros(0, np.int32)
        filters = {**self._filters, **parse_filters(r.get("filters"), self.genre_names)}
        when = r.get("time")
        when = self.default_time if when is None else number("time", when, 0.0)
        return Request(user_row, np.asarray(history_rows), float(last_time), seen, exclude_rows,
                       filters, when, k, parse_policy(r, self._defaults), unknown,
                       cold=user_row == 0 and len(history_rows) == 0)

    # ---- stages -----------------------------------------------------------------------------

    def _histories(self, reqs: list[Request]) -> np.ndarray:
        length = self.history_len
        hist_BxL = np.zeros((len(reqs), length), np.int32)
        for i, r in enumerate(reqs):
            h = r.history_rows[-length:]
            if len(h):
                hist_BxL[i, length - len(h):] = h
        return hist_BxL

    def _query_vectors(self, hist_BxL, user_B, time_B=None, last_time_B=None) -> np.ndarray:
        """The query tower over a padded bucket; it gets the inputs its export names."""
        b = len(user_B)
        bucket = _bucket(b)
        hist = np.zeros((bucket, hist_BxL.shape[1]), np.int32)
        hist[:b] = hist_BxL
        users = np.zeros(bucket, np.int32)
        users[:b] = user_B
        inputs = {"user": users, "history": hist, "user_feats": self.a.user_features[users]}
        if "time_context" in self.a.query_input_names:
            from recsys.data.batches import time_context
            times, last = np.full(bucket, self.default_time, np.int64), np.full(bucket, -1, np.int64)
            if time_B is not None:
                times[:b], last[:b] = time_B, last_time_B
            inputs["time_context"] = time_context(times, last)
        return np.asarray(self.a.query_fn(self.a.query_params, inputs))[:b]

    def _retrieve(self, reqs: list[Request], q_BxD, hist_BxL, fetch: int) -> np.ndarray:
        """Stage 1: ScaNN top-R' (R' leaves room for what filtering drops), popular items for
        cold requests, and the extra sources, merged without duplicates: [B, M] rows."""
        _, rows_BxR = self.a.searcher.search(q_BxD, fetch)
        rows_BxR = np.asarray(rows_BxR, np.int64)
        for i, r in enumerate(reqs):
            if r.cold:  # no user, no history: popular items instead of an uninformed query
                rows_BxR[i] = self._popular[:fetch]
        sources = self._extra_sources(reqs, hist_BxL)
        if sources is not None:
            # Extra sources take their slots from the tail of the main list.
            head = max(self.num_candidates - sources.shape[1], 0)
            rows_BxR = np.concatenate([rows_BxR[:, :head], sources, rows_BxR[:, head:]], axis=1)
        return filtering.dedupe(rows_BxR, len(self.a.item_vectors))

    def _filter(self, reqs: list[Request], q_BxD, hist_BxL, cand_BxM, fetch: int) -> np.ndarray:
        """Stage 2: the first N allowed candidates, [B, N]; requests left short of k search
        again, deeper (attribute filters can ban most of a user's neighbourhood)."""
        n, num_rows = self.num_candidates, len(self.a.item_vectors)

        def allowed_first(sub, cand):
            ok = filtering.allowed(sub, cand, self.availability.mask, self.a.item_genres,
                                   self.a.item_year, self.genre_names, self.a.item_release_year)
            return filtering.first_allowed(cand, ok, n)

        cand_BxN = allowed_first(reqs, cand_BxM)
        limit = min(fetch * REFETCH_LIMIT, num_rows - 1)
        short = [i for i, r in enumerate(reqs) if (cand_BxN[i] > 0).sum() < min(r.k, n)]
        while short and fetch < limit:
            fetch = min(fetch * REFETCH_GROWTH, limit)
            sub = [reqs[i] for i in short]
            cand_BxN[short] = allowed_first(sub, self._retrieve(sub, q_BxD[short],
                                                                hist_BxL[short], fetch))
            short = [i for i in short if (cand_BxN[i] > 0).sum() < min(reqs[i].k, n)]
        return cand_BxN

    def _extra_sources(self, reqs: list[Request], hist_BxL: np.ndarray) -> np.ndarray | None:
        """Nearest items of each request's latest items, then the most popular items."""
        parts = []
        m, j = self.cfg.recent_items, self.cfg.neighbours_per_item
        if m > 0 and j > 0:
            recent_BxM = hist_BxL[:, -m:]
            _, near = self.a.searcher.search(self.a.item_vectors[recent_BxM.ravel()], j + 1)
            near = np.asarray(near, np.int64).reshape(len(reqs), m, j + 1)
            near = np.where(recent_BxM[:, :, None] > 0, near, -1)
            # Neighbour rank first, then recency: each recent item's best neighbours come first.
            parts.append(near[:, ::-1, 1:].transpose(0, 2, 1).reshape(len(reqs), -1))
        if self.cfg.popular_candidates > 0:
            top = self._popular[:self.cfg.popular_candidates]
            parts.append(np.broadcast_to(top, (len(reqs), len(top))))
        return np.concatenate(parts, axis=1) if parts else None

    def _score(self, reqs: list[Request], q_BxD, hist_BxL, cand_BxN) -> np.ndarray:
        """Stage 3: the ranker over [bucket, N] (retrieval dot products without a ranker)."""
        valid_BxN = cand_BxN > 0
        rows_BxN = np.maximum(cand_BxN, 0)
        if self.a.ranker_fn is None:
            scores = np.einsum("bd,bnd->bn", q_BxD, self.a.item_vectors[rows_BxN])
            return np.where(valid_BxN, scores, -np.inf)
        b, bucket = len(reqs), _bucket(len(reqs))

        def pad(x, fill=0):
            out = np.full((bucket, *np.shape(x)[1:]), fill, np.asarray(x).dtype)
            out[:b] = x
            return out

        inputs = ranker_inputs(
            self.tables, pad(q_BxD), pad(np.asarray([r.user_row for r in reqs], np.int32)),
            pad(hist_BxL), pad(np.asarray([r.time for r in reqs], np.int64)),
            pad(np.asarray([r.last_time for r in reqs], np.int64), -1), pad(rows_BxN))
        scores = self._ranker(inputs)[:b]
        return np.where(valid_BxN, scores, -np.inf)

    def _ranker(self, inputs: dict) -> np.ndarray:
        typed = {k: np.asarray(inputs[k], dtype) for k, (dtype, _) in self._spec.items()}
        return np.asarray(self.a.ranker_fn(self.a.ranker_params, typed))

    def _zeros_inputs(self, b: int) -> dict:
        n = self.num_candidates
        return {k: np.zeros([b if s == "b" else n if s == "n" else int(s)
                             for s in shape.split(", ")], dtype)
                for k, (dtype, shape) in self._spec.items()}

    def _order(self, reqs: list[Request], cand_BxN, score_BxN) -> list[Recommendation]:
        """Stage 4: each request's policy over its scored candidates."""
        out = []
        for i, r in enumerate(reqs):
            picked = ordering.order(cand_BxN[i], score_BxN[i], r.k, r.policy,
                                    item_vectors=self.a.item_vectors,
                                    item_genres=self.a.item_genres,
                                    similarity=self.cfg.mmr_similarity, salt=r.user_row)
            rows = cand_BxN[i][picked]
            titles = (None if self.a.item_titles is None
                      else [str(x) for x in self.a.item_titles[rows]])
            out.append(Recommendation(items=[_py(x) for x in self.a.items.raw(rows)],
                                      scores=[float(s) for s in score_BxN[i][picked]],
                                      timings={}, unknown_ids=r.unknown, cold_start=r.cold,
                                      titles=titles))
        return out


def _bucket(b: int) -> int:
    for size in BATCH_BUCKETS:
        if b <= size:
            return size
    raise ValueError(f"batch of {b} is above the largest bucket {BATCH_BUCKETS[-1]}")


def _py(x):
    return x.item() if isinstance(x, np.generic) else x


__all__ = ["Recommendation", "Recommender", "RequestError"]
