"""`Recommender`: the four stages per request — retrieve, filter, score, order — with timings,
over one loaded artifacts version at a time (`reload` swaps in the published one)."""

from __future__ import annotations

import dataclasses
import pathlib
import threading
import time
from collections.abc import Sequence

import numpy as np

from recsys import artifacts as bundle
from recsys.artifacts import ArtifactError
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
    version: str = ""  # the artifacts version directory's name that produced it


@dataclasses.dataclass(frozen=True)
class Stages:
    """Everything a request reads, built from one loaded version and never changed after: a
    request takes one `Stages` and runs all four stages on it (only the availability mask inside
    `filter` changes, copy on write)."""

    version: str  # the version directory's name ("" for a bundle built in memory)
    artifacts: artifacts.Loaded
    cfg: ServeConfig
    genre_names: tuple[str, ...]
    num_candidates: int  # N: candidates per request after filtering
    scorer: scoring.Scorer
    retriever: retrieval.Retriever
    filter: filtering.Filter
    parser: RequestParser

    @classmethod
    def build(cls, loaded: artifacts.Loaded, cfg: ServeConfig) -> Stages:
        genre_names = tuple(loaded.manifest.get("genre_names", ()))
        # The catalogue may hold fewer than cfg.num_candidates items.
        n = min(cfg.num_candidates, len(loaded.item_vectors) - 1)
        scorer = scoring.Scorer(loaded, n)
        return cls(version=loaded.path.name if loaded.path else "", artifacts=loaded, cfg=cfg,
                   genre_names=genre_names, num_candidates=n, scorer=scorer,
                   retriever=retrieval.Retriever(loaded, cfg, n, scorer.default_time),
                   filter=filtering.Filter(loaded, genre_names, n),
                   parser=RequestParser(loaded, cfg, genre_names, scorer.default_time))

    def warmup(self) -> None:
        """Compiles the query tower and ranker for every batch bucket (fixed candidate count)."""
        self.retriever.warmup()
        self.scorer.warmup()


class Recommender:
    """Serves recommendations from an artifacts directory (see recsys.export, docs/serving.md).

    Thread-safe: requests share only read-only arrays, compiled functions and the availability
    mask, which `set_available` replaces atomically. Each request reads one `Stages` (one
    version) from start to end; `reload` builds the next one aside and swaps the reference.
    """

    def __init__(self, loaded: artifacts.Loaded, cfg: ServeConfig | None = None, *,
                 overrides: dict | None = None):
        """overrides: the ServeConfig fields `reload` lays over a new version's stored config."""
        self._stages = Stages.build(loaded, cfg or ServeConfig())
        self._overrides = dict(overrides or {})
        self._root = _root_or_none(loaded.path)  # where `reload` finds the published version
        self._unavailable: set = set()  # raw ids made unavailable; they carry over a reload
        self._swap_lock = threading.Lock()  # set_available vs the swap of `_stages`
        self._reload_lock = threading.Lock()  # one reload at a time

    @classmethod
    def load(cls, directory: str | pathlib.Path, warmup: bool = True, **overrides) -> Recommender:
        """Loads and verifies artifacts, then (by default) compiles every batch bucket.

        directory: an artifacts root (its `current` version is read), or a version directory.
        overrides: ServeConfig fields replacing the artifacts' own serve config; a bad one
        raises `recsys.config.ConfigError` (a ValueError) naming it, here rather than per request.
        """
        loaded = artifacts.load(directory)
        cfg = serve_config(loaded.manifest["config"].get("serve", {}), overrides)
        rec = cls(loaded, cfg, overrides=overrides)
        if warmup:
            rec.warmup()
        return rec

    def reload(self, warmup: bool = True) -> str:
        """Serves the version the artifacts root's `current` names now; returns its name.

        Runs in the caller's thread: the new version is loaded, verified and (by default) warmed
        up aside while requests go on with the old one, then one reference is swapped. Requests
        in flight finish on the version they started with. Nothing is reloaded when `current`
        still names the version served. A failed load (ArtifactError, ConfigError) leaves the old
        version serving.
        """
        if self._root is None:
            raise ArtifactError(f"{self.artifacts.path}: not a version of an artifacts root "
                                "(ROOT/versions/<id>), so there is no `current` to reload from")
        with self._reload_lock:
            published = bundle.published(self._root)
            if published is not None and published.name == self.version:
                return self.version
            loaded = artifacts.load(self._root)
            stages = Stages.build(
                loaded, serve_config(loaded.manifest["config"].get("serve", {}), self._overrides))
            if warmup:
                stages.warmup()
            with self._swap_lock:
                rows = stages.artifacts.items.lookup(list(self._unavailable))
                stages.filter.availability.set(rows[rows > 0], False)
                self._stages = stages
            return stages.version

    # What the version being served holds (read-only; a reload replaces it whole).
    version = property(lambda self: self._stages.version, doc="the served version's name")
    artifacts = property(lambda self: self._stages.artifacts, doc="the loaded bundle")
    cfg = property(lambda self: self._stages.cfg)
    genre_names = property(lambda self: self._stages.genre_names)
    num_candidates = property(lambda self: self._stages.num_candidates)
    scorer = property(lambda self: self._stages.scorer)
    retriever = property(lambda self: self._stages.retriever)
    filter = property(lambda self: self._stages.filter)
    parser = property(lambda self: self._stages.parser)

    def warmup(self) -> None:
        """Compiles the query tower and ranker for every batch bucket (fixed candidate count)."""
        self._stages.warmup()

    def known_users(self, n: int, seed: int = 0) -> list:
        """Up to n raw user ids of the served version, a seeded sample in vocabulary order."""
        ids = self.artifacts.users.ids
        pick = np.sort(np.random.default_rng(seed).choice(len(ids), min(n, len(ids)), False))
        return [ids[i].item() for i in pick]

    def user_query_vectors(self, user_ids: Sequence) -> np.ndarray:
        """[Q, D] the query vectors serving computes for known users from their stored
        histories (the real queries an index is tuned or measured on)."""
        s = self._stages
        reqs = [s.parser.parse({"user_id": u}) for u in user_ids]
        parts = [s.retriever.request_vectors(b, s.retriever.histories(b))
                 for b in (reqs[lo:lo + BATCH_BUCKETS[-1]]
                           for lo in range(0, len(reqs), BATCH_BUCKETS[-1]))]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)

    def set_available(self, item_ids, available: bool) -> list:
        """Marks raw item ids (un)available for every later request, this version and the ones
        `reload` brings; returns the ids this version does not know (they are not marked)."""
        ids = id_list("item_ids", item_ids)
        with self._swap_lock:
            stages = self._stages
            rows = stages.artifacts.items.lookup(ids)
            known = rows[rows > 0]
            stages.filter.availability.set(known, bool(available))
            raw = stages.artifacts.items.raw(known).tolist() if len(known) else []
            if available:
                self._unavailable.difference_update(raw)
            else:
                self._unavailable.update(raw)
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
        stages = self._stages  # one version for the whole call, whatever a reload does meanwhile
        parsed = [stages.parser.parse(r) for r in requests]
        out = []
        for lo in range(0, len(parsed), BATCH_BUCKETS[-1]):
            out += _run(stages, parsed[lo:lo + BATCH_BUCKETS[-1]], t0)
            t0 = time.perf_counter()
        return out


def _run(s: Stages, reqs: list[Request], t0: float) -> list[Recommendation]:
    marks = [time.perf_counter()]
    hist_BxL = s.retriever.histories(reqs)
    q_BxD = s.retriever.request_vectors(reqs, hist_BxL)
    depth_B = np.asarray([s.retriever.depth(r) for r in reqs], np.int64)
    groups = s.retriever.search(reqs, q_BxD, hist_BxL, depth_B)
    marks.append(time.perf_counter())
    cand_BxN = s.retriever.first_allowed(reqs, groups, s.filter.first_allowed)
    cand_BxN = s.retriever.refetch(reqs, q_BxD, hist_BxL, cand_BxN, depth_B,
                                   s.filter.first_allowed)
    marks.append(time.perf_counter())
    score_BxN = s.scorer.score(reqs, q_BxD, hist_BxL, cand_BxN)
    marks.append(time.perf_counter())
    picked = ordering.order_batch(reqs, cand_BxN, score_BxN, item_vectors=s.artifacts.item_vectors,
                                  item_genres=s.artifacts.item_genres,
                                  similarity=s.cfg.mmr_similarity)
    out = [_result(s, r, cand_BxN[i][p], score_BxN[i][p])
           for i, (r, p) in enumerate(zip(reqs, picked))]
    marks.append(time.perf_counter())
    timings = {name: (marks[i + 1] - marks[i]) * 1e3 for i, name in enumerate(STAGES)}
    timings["total"] = (marks[-1] - t0) * 1e3
    for rec in out:
        rec.timings = dict(timings)
    return out


def _result(s: Stages, r: Request, rows, scores) -> Recommendation:
    titles = s.artifacts.item_titles
    return Recommendation(items=s.artifacts.items.raw(rows).tolist(),
                          scores=[float(x) for x in scores], timings={},
                          unknown_ids=r.unknown, cold_start=r.cold,
                          titles=None if titles is None else [str(x) for x in titles[rows]],
                          version=s.version)


def _root_or_none(version: pathlib.Path | None) -> pathlib.Path | None:
    """The artifacts root a loaded version belongs to (None: a bundle outside any root)."""
    if version is None:
        return None
    try:
        return bundle.root_of(version)
    except ArtifactError:
        return None


__all__ = ["Recommendation", "Recommender", "RequestError", "Stages"]
