"""Stage 2, vectorised over a batch: seen, excluded, unavailable and attribute-filtered items."""

from __future__ import annotations

import threading

import numpy as np

from recsys.features import year_bucket
from recsys.serve.artifacts import Loaded
from recsys.serve.requests import Request


class Availability:
    """Which item rows may be served; changed while serving (copy on write, readers never lock)."""

    def __init__(self, num_rows: int):
        mask = np.ones(num_rows, bool)
        mask[0] = False
        self._mask = mask
        self._lock = threading.Lock()

    @property
    def mask(self) -> np.ndarray:
        """The current [V] mask (a snapshot: later changes make a new array)."""
        return self._mask

    def set(self, rows: np.ndarray, available: bool) -> None:
        with self._lock:
            mask = self._mask.copy()
            mask[np.asarray(rows, np.int64)] = available
            mask[0] = False
            self._mask = mask


class Filter:
    """Stage 2 over one artifacts directory's item attributes and the live availability set."""

    def __init__(self, loaded: Loaded, genre_names: tuple[str, ...], num_candidates: int):
        self.availability = Availability(len(loaded.item_vectors))
        self._loaded = loaded
        self._genre_names = genre_names
        self._n = num_candidates

    def first_allowed(self, reqs: list[Request], cand_BxM: np.ndarray) -> np.ndarray:
        """[B, N] rows: the first N candidates of each request that no rule bans (-1 padded)."""
        art = self._loaded
        ok_BxM = allowed(reqs, cand_BxM, self.availability.mask, art.item_genres, art.item_year,
                         self._genre_names, art.item_release_year)
        return first_allowed(cand_BxM, ok_BxM, self._n)


def allowed(reqs: list[Request], cand_BxM: np.ndarray, available_V: np.ndarray,
            item_genres: np.ndarray, item_year: np.ndarray, genre_names: tuple[str, ...],
            item_release_year: np.ndarray | None = None):
    """[B, M] bool: the candidate is a real, available item that no rule of its request bans.

    Year bounds are inclusive and compare release years (`item_release_year`). Artifacts
    written before release years were stored only have the 5-year buckets (`item_year`): there
    a bound inside a bucket keeps that whole bucket. Items of unknown year fail any year bound.
    """
    exact = item_release_year is not None
    to_unit = int if exact else (lambda year: int(year_bucket(year)))
    year_V = item_release_year if exact else item_year
    no_bound = np.iinfo(np.int64).max
    b, _ = cand_BxM.shape
    rows_BxM = np.maximum(cand_BxM, 0)
    ok = (cand_BxM > 0) & available_V[rows_BxM]
    # Seen and excluded rows: each request's candidates searched in its own sorted list (a few
    # microseconds a request; np.isin over (request, row) keys took ~40 for a single request).
    for i, r in enumerate(reqs):
        banned = np.sort(np.concatenate([r.seen_rows, r.exclude_rows]))
        if len(banned):
            at = np.minimum(np.searchsorted(banned, rows_BxM[i]), len(banned) - 1)
            ok[i] &= banned[at] != rows_BxM[i]
    if not any(r.filters for r in reqs):
        return ok
    col = {name: i for i, name in enumerate(genre_names)}
    g = item_genres.shape[1]
    not_BxG, any_BxG = np.zeros((b, g), np.float32), np.zeros((b, g), np.float32)
    lo_B, hi_B = np.zeros(b, np.int64), np.full(b, no_bound, np.int64)
    for i, r in enumerate(reqs):
        f = r.filters
        not_BxG[i, [col[x] for x in f.get("genres_not", ())]] = 1.0
        any_BxG[i, [col[x] for x in f.get("genres_any", ())]] = 1.0
        if "year_min" in f:
            lo_B[i] = max(to_unit(f["year_min"]), 1)
        if "year_max" in f:
            hi_B[i] = to_unit(f["year_max"])
    genres_BxMxG = item_genres[rows_BxM]
    ok &= np.einsum("bmg,bg->bm", genres_BxMxG, not_BxG) == 0
    wants_any_B = any_BxG.sum(1) > 0
    ok &= ~wants_any_B[:, None] | (np.einsum("bmg,bg->bm", genres_BxMxG, any_BxG) > 0)
    year_BxM = year_V[rows_BxM]
    has_bound_B = (lo_B > 0) | (hi_B < no_bound)
    ok &= ~has_bound_B[:, None] | ((year_BxM >= lo_B[:, None]) & (year_BxM <= hi_B[:, None])
                                   & (year_BxM > 0))
    return ok


def first_allowed(cand_BxM: np.ndarray, ok_BxM: np.ndarray, n: int) -> np.ndarray:
    """The first n allowed candidates of each row, in order: [B, n] rows (-1 where fewer)."""
    order_BxM = np.argsort(~ok_BxM, axis=1, kind="stable")[:, :n]
    rows = np.take_along_axis(cand_BxM, order_BxM, axis=1)
    keep = np.take_along_axis(ok_BxM, order_BxM, axis=1)
    out = np.where(keep, rows, -1)
    if out.shape[1] < n:
        out = np.concatenate([out, np.full((len(out), n - out.shape[1]), -1, out.dtype)], 1)
    return out
