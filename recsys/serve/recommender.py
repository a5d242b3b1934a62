"""`Recommender`: the four stages per request — retrieve, filter, score, order — with timings."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import threading
import time

import numpy as np

from recsys.serve import artifacts

BATCH_BUCKETS = (1, 8, 64, 512)  # request batches are padded to these sizes: no recompiles


class RequestError(ValueError):
    """A bad request; `field` names the offending argument."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass
class Recommendation:
    items: list  # raw item ids, best first
    scores: list[float]  # ranker scores (retrieval scores when there is no ranker)
    timings: dict[str, float]  # milliseconds per stage and in total
    unknown_ids: list = dataclasses.field(default_factory=list)  # request ids not in the vocabularies
    cold_start: bool = False  # True when neither a known user nor a known history was given
    titles: list[str] | None = None


@dataclasses.dataclass
class _Request:
    user_row: int
    history_rows: np.ndarray  # [n] item rows, oldest first (0s removed)
    seen_rows: np.ndarray  # rows to exclude as seen
    exclude_rows: np.ndarray
    k: int
    unknown: list
    cold: bool


class Recommender:
    """Serves recommendations from an artifacts directory (see recsys.export)."""

    def __init__(self, loaded: artifacts.Loaded, num_candidates: int = 200,
                 exclude_seen: bool = True):
        self.a = loaded
        self.num_candidates = num_candidates
        self.exclude_seen = exclude_seen
        self.history_len = int(loaded.manifest["history_len"])
        self.num_rows = len(loaded.item_vectors)
        self._popular = np.argsort(-loaded.item_logpop[1:], kind="stable") + 1
        self._lock = threading.Lock()

    @classmethod
    def load(cls, directory: str | pathlib.Path, warmup: bool = True, **kwargs) -> Recommender:
        """Loads, verifies and (by default) compiles every batch bucket before the first request."""
        loaded = artifacts.load(directory)
        serve_cfg = loaded.manifest["config"]["serve"]
        kwargs.setdefault("num_candidates", serve_cfg["num_candidates"])
        kwargs.setdefault("exclude_seen", serve_cfg["exclude_seen"])
        rec = cls(loaded, **kwargs)
        if warmup:
            rec.warmup()
        return rec

    def warmup(self) -> None:
        for b in BATCH_BUCKETS[:3]:
            self.recommend_batch([{"history": []}] * b, )

    # ---- public API -------------------------------------------------------------------------

    def recommend(self, user_id=None, history=None, k: int = 10, exclude=None,
                  exclude_seen: bool | None = None) -> Recommendation:
        """Top-k items for a known user (raw id) and/or a history of raw item ids."""
        return self.recommend_batch([dict(user_id=user_id, history=history, k=k, exclude=exclude,
                                          exclude_seen=exclude_seen)])[0]

    def recommend_batch(self, requests: list[dict]) -> list[Recommendation]:
        """Runs many requests through each stage together (one tower call, one index search)."""
        if not isinstance(requests, (list, tuple)):
            raise RequestError("requests", f"expected a list of dicts, got {type(requests).__name__}")
        t = [time.perf_counter()]
        reqs = [self._parse(r if isinstance(r, dict) else _bad_request(r)) for r in requests]
        if not reqs:
            return []
        q_BxD = self._query_vectors(reqs)
        t.append(time.perf_counter())
        cand_BxR, score_BxR = self._retrieve(reqs, q_BxD)
        t.append(time.perf_counter())
        cand_BxR = self._filter(reqs, cand_BxR)
        t.append(time.perf_counter())
        score_BxR = self._score(reqs, q_BxD, cand_BxR, score_BxR)
        t.append(time.perf_counter())
        out = self._order(reqs, cand_BxR, score_BxR)
        t.append(time.perf_counter())
        stages = ("query", "retrieval", "filtering", "scoring", "ordering")
        timings = {s: (t[i + 1] - t[i]) * 1e3 for i, s in enumerate(stages)}
        timings["total"] = (t[-1] - t[0]) * 1e3
        for rec in out:
            rec.timings = dict(timings)
        return out

    # ---- request parsing --------------------------------------------------------------------

    def _parse(self, r: dict) -> _Request:
        unknown_keys = set(r) - {"user_id", "history", "k", "exclude", "exclude_seen"}
        if unknown_keys:
            raise RequestError(sorted(unknown_keys)[0], "unknown request field")
        k = r.get("k", 10)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise RequestError("k", f"must be a positive int, got {k!r}")
        user_id, unknown = r.get("user_id"), []
        user_row = 0
        if user_id is not None:
            _check_id("user_id", user_id)
            user_row = int(self.a.users.lookup([user_id])[0])
            if user_row == 0:
                unknown.append(user_id)
        history = r.get("history")
        stored = self.a.history_items[self.a.history_offsets[user_row]:
                                      self.a.history_offsets[user_row + 1]]
        if history is not None:
            if isinstance(history, (str, bytes)) or not isinstance(history, (list, tuple, np.ndarray)):
                raise RequestError("history", f"expected a list of item ids, got {type(history).__name__}")
            for h in history:
                _check_id("history", h)
            rows = self.a.items.lookup(list(history)) if len(history) else np.zeros(0, np.int32)
            unknown += [h for h, row in zip(history, rows) if row == 0]
            history_rows = rows[rows > 0]
        else:
            history_rows = stored
        exclude = r.get("exclude") or []
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, (list, tuple, set, np.ndarray)):
            raise RequestError("exclude", f"expected a list of item ids, got {type(exclude).__name__}")
        for e in exclude:
            _check_id("exclude", e)
        exclude_rows = self.a.items.lookup(list(exclude)) if len(exclude) else np.zeros(0, np.int32)
        exclude_seen = r.get("exclude_seen")
        if exclude_seen is None:
            exclude_seen = self.exclude_seen
        if not isinstance(exclude_seen, (bool, np.bool_)):
            raise RequestError("exclude_seen", f"must be a bool, got {exclude_seen!r}")
        seen = np.union1d(stored, history_rows) if exclude_seen else np.zeros(0, np.int32)
        return _Request(user_row, history_rows, seen, exclude_rows, int(k), unknown,
                        cold=user_row == 0 and len(history_rows) == 0)

    # ---- stages -----------------------------------------------------------------------------

    def _query_vectors(self, reqs: list[_Request]) -> np.ndarray:
        b, length = len(reqs), self.history_len
        bucket = _bucket(b)
        hist_BxL = np.zeros((bucket, length), np.int32)
        for i, r in enumerate(reqs):
            h = r.history_rows[-length:]
            if len(h):
                hist_BxL[i, length - len(h):] = h
        user_B = np.zeros(bucket, np.int32)
        user_B[:b] = [r.user_row for r in reqs]
        inputs = {"user": user_B, "history": hist_BxL, "user_feats": self.a.user_features[user_B]}
        return np.asarray(self.a.query_fn(self.a.query_params, inputs))[:b]

    def _retrieve(self, reqs: list[_Request], q_BxD: np.ndarray):
        """ScaNN top-R', where R' leaves room for the seen and excluded items to be dropped."""
        extra = max(len(r.seen_rows) + len(r.exclude_rows) for r in reqs)
        fetch = min(self.num_candidates + extra, self.num_rows - 1)
        scores_BxR, rows_BxR = self.a.searcher.search(q_BxD, fetch)
        rows_BxR = np.asarray(rows_BxR, np.int64)
        for i, r in enumerate(reqs):
            if r.cold:  # no user, no history: popular items instead of an uninformed query
                rows_BxR[i] = self._popular[:fetch]
                scores_BxR[i] = self.a.item_logpop[rows_BxR[i]]
        return rows_BxR, np.asarray(scores_BxR, np.float32)

    def _filter(self, reqs: list[_Request], cand_BxR: np.ndarray) -> np.ndarray:
        """Drops seen and excluded items (-1), keeping retrieval order; returns [B, R]."""
        out = np.full((len(reqs), self.num_candidates), -1, np.int64)
        for i, r in enumerate(reqs):
            row = cand_BxR[i]
            banned = np.concatenate([r.seen_rows, r.exclude_rows]).astype(np.int64)
            keep = row[(row > 0) & ~np.isin(row, banned)][: self.num_candidates]
            out[i, :len(keep)] = keep
        return out

    def _score(self, reqs, q_BxD, cand_BxR, retrieval_scores_BxR) -> np.ndarray:
        valid_BxR = cand_BxR > 0
        if self.a.ranker_fn is None:
            q = q_BxD[:, None, :] * self.a.item_vectors[np.maximum(cand_BxR, 0)]
            return np.where(valid_BxR, q.sum(-1), -np.inf)
        b, bucket = len(reqs), _bucket(len(reqs))
        cand = np.zeros((bucket, cand_BxR.shape[1]), np.int64)
        cand[:b] = np.maximum(cand_BxR, 0)
        q = np.zeros((bucket, q_BxD.shape[1]), np.float32)
        q[:b] = q_BxD
        users = np.zeros(bucket, np.int64)
        users[:b] = [r.user_row for r in reqs]
        inputs = {"q": q, "c": self.a.item_vectors[cand], "item_genres": self.a.item_genres[cand],
                  "item_year": self.a.item_year[cand], "item_logpop": self.a.item_logpop[cand],
                  "user_feats": self.a.user_features[users]}
        scores = np.asarray(self.a.ranker_fn(self.a.ranker_params, inputs))[:b]
        return np.where(valid_BxR, scores, -np.inf)

    def _order(self, reqs, cand_BxR, score_BxR) -> list[Recommendation]:
        out = []
        for i, r in enumerate(reqs):
            order = np.argsort(-score_BxR[i], kind="stable")[: r.k]
            order = order[np.isfinite(score_BxR[i][order])]
            rows = cand_BxR[i][order]
            titles = None if self.a.item_titles is None else [str(x) for x in self.a.item_titles[rows]]
            out.append(Recommendation(items=[_py(x) for x in self.a.items.raw(rows)],
                                      scores=[float(s) for s in score_BxR[i][order]],
                                      timings={}, unknown_ids=r.unknown, cold_start=r.cold,
                                      titles=titles))
        return out


def _bucket(b: int) -> int:
    for size in BATCH_BUCKETS:
        if b <= size:
            return size
    return int(math.ceil(b / BATCH_BUCKETS[-1]) * BATCH_BUCKETS[-1])


def _check_id(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
        raise RequestError(field, f"ids must be str or int, got {value!r} ({type(value).__name__})")


def _bad_request(r):
    raise RequestError("requests", f"each request must be a dict, got {type(r).__name__}")


def _py(x):
    return x.item() if isinstance(x, np.generic) else x
