"""What the ranker reads for each (request, candidate), assembled in numpy for training and serving."""

from __future__ import annotations

import dataclasses

import numpy as np

from recsys.config import NUM_YEAR_BUCKETS
from recsys.features import DAY, ranker_numeric, year_bucket_of_time

WINDOWS_DAYS = (1, 7, 30, 365)  # trailing windows of item popularity at the request time
NUM_ITEM_STATS = 3 + len(WINDOWS_DAYS)  # logpop, windows..., log age in days, known-before flag
NUM_CONTEXT = 3  # log1p(history length), log1p(days since the last event), last time known
NUM_SIMS = 4  # retrieval score q.c; cosine to the latest and to the closest history item; genre
# affinity (the candidate's genres in the history's genre profile)
NUM_NUMERIC = NUM_SIMS + NUM_ITEM_STATS + NUM_CONTEXT  # standardised by the model
# Year gaps (request's year bucket minus the item's) are clipped into GAP_BUCKETS rows; row 0 is
# an unknown year, row 1 an item from a later bucket than the request (not yet released).
GAP_BUCKETS = NUM_YEAR_BUCKETS + 2
_TIME_BITS = 40  # key = row << 40 | seconds since the log's first event (35k years)


@dataclasses.dataclass(frozen=True)
class ItemTimeline:
    """When each item row was interacted with: sorted (row, time) keys of an event log."""

    keys_E: np.ndarray  # [E] int64 row << _TIME_BITS | (time - t0), sorted
    t0: int  # the log's first time, seconds
    first_time_V: np.ndarray  # [V] int64 first event time per row (int64 max when never)
    last_time: int  # the log's last time: the default request time

    @classmethod
    def build(cls, rows_E: np.ndarray, times_E: np.ndarray, num_rows: int) -> ItemTimeline:
        rows_E, times_E = np.asarray(rows_E, np.int64), np.asarray(times_E, np.int64)
        t0 = int(times_E.min()) if len(times_E) else 0
        keys_E = np.sort((rows_E << _TIME_BITS) | (times_E - t0))
        first_V = np.full(num_rows, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first_V, rows_E, times_E)
        last = int(times_E.max()) if len(times_E) else 0
        return cls(keys_E, t0, first_V, last)

    def counts_before(self, rows_BxN: np.ndarray, time_B: np.ndarray, window: int) -> np.ndarray:
        """Events of each row in [time - window, time): [B, N] int64 (window <= 0: all before)."""
        base_BxN = np.asarray(rows_BxN, np.int64) << _TIME_BITS
        hi_B = np.clip(np.asarray(time_B, np.int64) - self.t0, 0, (1 << _TIME_BITS) - 1)
        lo_B = np.zeros_like(hi_B) if window <= 0 else np.maximum(hi_B - window, 0)
        return (np.searchsorted(self.keys_E, base_BxN + hi_B[:, None])
                - np.searchsorted(self.keys_E, base_BxN + lo_B[:, None]))


@dataclasses.dataclass(frozen=True)
class RankerTables:
    """Everything the ranker reads by item or user row, beyond the request itself."""

    item_vectors: np.ndarray  # [V, D] candidate-tower vectors
    item_genres: np.ndarray  # [V, G] multi-hot
    item_year: np.ndarray  # [V] year bucket (0 unknown)
    item_logpop: np.ndarray  # [V] log(1 + training count)
    user_features: np.ndarray  # [U, F] category codes
    timeline: ItemTimeline


def request_inputs(tables: RankerTables, q_BxD, user_B, history_BxL, time_B,
                   last_time_B) -> dict:
    """Per-request inputs: query vector, user, history rows, their vectors and genre profile,
    context.

    Args:
      history_BxL: item rows, oldest first, 0-padded on the left.
      time_B: request times (seconds).
      last_time_B: time of each user's latest history event; < 0 when unknown.
    """
    history_BxL = np.asarray(history_BxL, np.int32)
    user_B = np.asarray(user_B, np.int32)
    length_B = (history_BxL > 0).sum(1)
    known_B = np.asarray(last_time_B) >= 0
    gap_days_B = np.where(known_B, np.maximum(np.asarray(time_B) - last_time_B, 0) / DAY, 0.0)
    context_BxC = np.stack([np.log1p(length_B), np.log1p(gap_days_B), known_B], axis=1)
    genres_BxG = tables.item_genres[history_BxL].sum(1) / np.maximum(length_B, 1)[:, None]
    return {"q": np.asarray(q_BxD, np.float32), "user": user_B,
            "user_feats": tables.user_features[user_B], "history": history_BxL,
            "h": tables.item_vectors[history_BxL], "history_genres": genres_BxG.astype(np.float32),
            "context": context_BxC.astype(np.float32)}


def candidate_inputs(tables: RankerTables, cand_BxN, time_B) -> dict:
    """Per-candidate inputs for item rows [B, N] (row 0 = padding) at the request times."""
    cand_BxN = np.asarray(cand_BxN, np.int32)
    time_B = np.asarray(time_B, np.int64)
    timeline = tables.timeline
    windows = [np.log1p(timeline.counts_before(cand_BxN, time_B, d * DAY)) for d in WINDOWS_DAYS]
    first_BxN = timeline.first_time_V[cand_BxN]
    known_BxN = first_BxN < time_B[:, None]
    age_days_BxN = np.where(known_BxN, (time_B[:, None] - np.minimum(first_BxN, time_B[:, None]))
                            / DAY, 0.0)
    stats_BxNxS = np.stack([tables.item_logpop[cand_BxN], *windows, np.log1p(age_days_BxN),
                            known_BxN], axis=-1).astype(np.float32)
    year_BxN = tables.item_year[cand_BxN]
    gap_BxN = year_bucket_of_time(time_B)[:, None] - year_BxN
    gap_BxN = np.where(year_BxN == 0, 0, np.where(gap_BxN < 0, 1, np.minimum(gap_BxN + 2,
                                                                             GAP_BUCKETS - 1)))
    return {"item": cand_BxN, "c": tables.item_vectors[cand_BxN],
            "item_genres": tables.item_genres[cand_BxN], "item_year": year_BxN.astype(np.int32),
            "year_gap": gap_BxN.astype(np.int32), "item_stats": stats_BxNxS}


def ranker_inputs(tables: RankerTables, q_BxD, user_B, history_BxL, time_B, last_time_B,
                  cand_BxN) -> dict:
    """The ranker's whole input dict for B requests with N candidate rows each."""
    out = {**request_inputs(tables, q_BxD, user_B, history_BxL, time_B, last_time_B),
           **candidate_inputs(tables, cand_BxN, time_B)}
    out["item_sims"] = similarities(out)
    return out


def similarities(x: dict) -> np.ndarray:
    """[B, N, NUM_SIMS] float32: q.c, cosine to the latest / closest history item, genre affinity."""
    mask_BxL = x["history"] > 0
    score_BxN = np.einsum("bd,bnd->bn", x["q"], x["c"])
    cos_BxNxL = np.einsum("bnd,bld->bnl", x["c"], x["h"])
    last_BxN = np.where(mask_BxL[:, None, -1], cos_BxNxL[..., -1], 0.0)
    closest_BxN = np.where(mask_BxL.any(1)[:, None],
                           np.where(mask_BxL[:, None, :], cos_BxNxL, -np.inf).max(-1), 0.0)
    genres_BxNxG = x["item_genres"]
    affinity_BxN = (np.einsum("bng,bg->bn", genres_BxNxG, x["history_genres"])
                    / np.maximum(genres_BxNxG.sum(-1), 1.0))
    return np.stack([score_BxN, last_BxN, closest_BxN, affinity_BxN], -1).astype(np.float32)


def numeric_stats(inputs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (floored at 1e-3) of the numeric features
    (recsys.features.ranker_numeric, [NUM_NUMERIC] each) over real candidates."""
    rows = np.concatenate([ranker_numeric(x)[x["item"] > 0] for x in inputs]).astype(np.float64)
    return rows.mean(0).astype(np.float32), np.maximum(rows.std(0), 1e-3).astype(np.float32)


def input_spec(d: int, g: int, f: int, length: int) -> dict:
    """name -> (dtype, symbolic shape) of the ranker inputs, for jax.export ('b' requests,
    'n' candidates)."""
    s = NUM_ITEM_STATS
    return {"q": (np.float32, f"b, {d}"), "user": (np.int32, "b"),
            "user_feats": (np.int32, f"b, {f}"), "history": (np.int32, f"b, {length}"),
            "h": (np.float32, f"b, {length}, {d}"), "history_genres": (np.float32, f"b, {g}"),
            "context": (np.float32, f"b, {NUM_CONTEXT}"),
            "item": (np.int32, "b, n"), "c": (np.float32, f"b, n, {d}"),
            "item_genres": (np.float32, f"b, n, {g}"), "item_year": (np.int32, "b, n"),
            "year_gap": (np.int32, "b, n"), "item_stats": (np.float32, f"b, n, {s}"),
            "item_sims": (np.float32, f"b, n, {NUM_SIMS}")}
