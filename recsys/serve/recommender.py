"""`Recommender`: the four stages per request — retrieve, filter, score, order — with timings."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Sequence

from recsys.config import ServeConfig
from recsys.serve import artifacts, filtering, ordering, retrieval, scoring
from recsys.serve.requests import (
    BATCH_BUCKETS,
    Request,
    RequestError,
    RequestParser,
    id_list,
    serve_config,
)

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
        self.artifacts = loaded  # read-only: vocabularies, item tables, stored histories
        self.cfg = cfg or ServeConfig()
        self.genre_names = tuple(loaded.manifest.get("genre_names", ()))
        # N: candidates per request after filtering (the catalogue may hold fewer).
        self.num_candidates = min(self.cfg.num_candidates, len(loaded.item_vectors) - 1)
        self.scorer = scoring.Scorer(loaded, self.num_candidates)
        self.retriever = retrieval.Retriever(loaded, self.cfg, self.num_candidates,
                                             self.scorer.default_time)
        self.filter = filtering.Filter(loaded, self.genre_names, self.num_candidates)
        self.parser = RequestParser(loaded, self.cfg, self.genre_names, self.scorer.default_time)

    @classmethod
    def load(cls, directory: str | pathlib.Path, warmup: bool = True, **overrides) -> Recommender:
        """Loads and verifies artifacts, then (by default) compiles every batch bucket.

        overrides: ServeConfig fields replacing the artifacts' own serve config; a bad one
        raises `recsys.config.ConfigError` (a ValueError) naming it, here rather than per request.
        """
        loaded = artifacts.load(directory)
        cfg = serve_config(loaded.manifest["config"].get("serve", {}), overrides)
        rec = cls(loaded, cfg)
        if warmup:
            rec.warmup()
        return rec

    def warmup(self) -> None:
        """Compiles the query tower and ranker for every batch bucket (fixed candidate count)."""
        self.retriever.warmup()
        self.scorer.warmup()

    def set_available(self, item_ids, available: bool) -> list:
        """Marks raw item ids (un)available for every later request; returns the unknown ids."""
        ids = id_list("item_ids", item_ids)
        rows = self.artifacts.items.lookup(ids)
        self.filter.availability.set(rows[rows > 0], bool(available))
        return [i for i, r in zip(ids, rows) if r == 0]

    def recommend(self, user_id: str | int | None = None,
                  history: Sequence[str | int] | None = None, k: int = 10, *,
                  exclude: Sequence[str | int] | None = None, exclude_seen: bool | None = None,
                  filters: dict | None = None, time: float | None = None,
                  ordering: str | None = None, mmr_lambda: float | None = None,
                  genre_cap: int | None = None, temperature: float | None = None,
                  seed: int | None = None) -> Recommendation:
        """Top-k items for a known user and/or a history of raw item ids (docs/serving.md).

        Args:
          user_id: raw user id; an unknown one is reported in `unknown_ids`.
          history: raw item ids, oldest first; replaces the user's stored history as the query.
          k: items wanted (> 0); rules may leave fewer.
          exclude: raw item ids never to recommend.
          exclude_seen: drop the stored and given history (None: `serve.exclude_seen`).
          filters: item rules merged over the config's: genres_not, genres_any (genre names),
            year_min, year_max (inclusive release years).
          time: request time in Unix seconds (None: the artifacts' latest event).
          ordering, mmr_lambda, genre_cap, temperature, seed: stage-4 policy; None takes the
            serve config's default (seed 0).
        Raises:
          RequestError: a bad field, named in `.field`.
        """
        return self.recommend_batch([{
            "user_id": user_id, "history": history, "k": k, "exclude": exclude,
            "exclude_seen": exclude_seen, "filters": filters, "time": time, "ordering": ordering,
            "mmr_lambda": mmr_lambda, "genre_cap": genre_cap, "temperature": temperature,
            "seed": seed}])[0]

    def recommend_batch(self, requests: list[dict]) -> list[Recommendation]:
        """Runs many request dicts (the fields of `recommend`) through each stage together: one
        tower call, one index search, one ranker call per bucket of up to 256 requests."""
        if not isinstance(requests, (list, tuple)):
            raise RequestError("requests",
                               f"expected a list of dicts, got {type(requests).__name__}")
        t0 = time.perf_counter()
        parsed = [self.parser.parse(r) for r in requests]
        out = []
        for lo in range(0, len(parsed), BATCH_BUCKETS[-1]):
            out += self._run(parsed[lo:lo + BATCH_BUCKETS[-1]], t0)
            t0 = time.perf_counter()
        return out

    def _run(self, reqs: list[Request], t0: float) -> list[Recommendation]:
        marks = [time.perf_counter()]
        hist_BxL = self.retriever.histories(reqs)
        q_BxD = self.retriever.request_vectors(reqs, hist_BxL)
        fetch = self.retriever.depth(reqs)
        cand_BxM = self.retriever.retrieve(reqs, q_BxD, hist_BxL, fetch)
        marks.append(time.perf_counter())
        cand_BxN = self.filter.first_allowed(reqs, cand_BxM)
        cand_BxN = self.retriever.refetch(reqs, q_BxD, hist_BxL, cand_BxN, fetch,
                                          self.filter.first_allowed)
        marks.append(time.perf_counter())
        score_BxN = self.scorer.score(reqs, q_BxD, hist_BxL, cand_BxN)
        marks.append(time.perf_counter())
        picked = ordering.order_batch(reqs, cand_BxN, score_BxN,
                                      item_vectors=self.artifacts.item_vectors,
                                      item_genres=self.artifacts.item_genres,
                                      similarity=self.cfg.mmr_similarity)
        out = [self._result(r, cand_BxN[i][p], score_BxN[i][p])
               for i, (r, p) in enumerate(zip(reqs, picked))]
        marks.append(time.perf_counter())
        timings = {s: (marks[i + 1] - marks[i]) * 1e3 for i, s in enumerate(STAGES)}
        timings["total"] = (marks[-1] - t0) * 1e3
        for rec in out:
            rec.timings = dict(timings)
        return out

    def _result(self, r: Request, rows, scores) -> Recommendation:
        titles = self.artifacts.item_titles
        return Recommendation(items=self.artifacts.items.raw(rows).tolist(),
                              scores=[float(s) for s in scores], timings={},
                              unknown_ids=r.unknown, cold_start=r.cold,
                              titles=None if titles is None else [str(x) for x in titles[rows]])


__all__ = ["Recommendation", "Recommender", "RequestError"]
