"""What the ranker reads for each (request, candidate): assembled in numpy for training
(`ranker_inputs`), and computed inside the jitted serving call from device-resident tables
(`device_tables`, `device_ranker_inputs`) with the same values to float tolerance."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
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


def similarities(x: dict, xp=np):
    """[B, N, NUM_SIMS] float32: q.c, cosine to the latest / closest history item, genre affinity.

    `xp` is numpy (training) or jax.numpy (serving, inside jit)."""
    mask_BxL = x["history"] > 0
    score_BxN = xp.einsum("bd,bnd->bn", x["q"], x["c"])
    cos_BxNxL = xp.einsum("bnd,bld->bnl", x["c"], x["h"])
    last_BxN = xp.where(mask_BxL[:, None, -1], cos_BxNxL[..., -1], 0.0)
    closest_BxN = xp.where(mask_BxL.any(1)[:, None],
                           xp.where(mask_BxL[:, None, :], cos_BxNxL, -np.inf).max(-1), 0.0)
    genres_BxNxG = x["item_genres"]
    affinity_BxN = (xp.einsum("bng,bg->bn", genres_BxNxG, x["history_genres"])
                    / xp.maximum(genres_BxNxG.sum(-1), 1.0))
    return xp.stack([score_BxN, last_BxN, closest_BxN, affinity_BxN], -1).astype(np.float32)


# ---- the same inputs inside the jitted serving call ---------------------------------------
# JAX computes in 32 bits, so times travel as int32 pairs (day, second of the day) since 1970:
# every request time (up to requests.MAX_TIME) is exact, and windows, ages and calendar years
# are computed on the pairs.

_NEVER = (np.iinfo(np.int32).max, 0)  # the (day, second) of an item's first event when it has none
SEARCH_WAYS = 8  # window counts search each row's events 8-ary: 3 steps for 511 events


@dataclasses.dataclass(frozen=True)
class DeviceLayout:
    """What `device_ranker_inputs` must know of `device_tables` when it is traced."""

    dim: int  # D: item_floats[:, :D] are the item vectors
    num_genres: int  # G: item_floats[:, D:D + G] the genres; item_floats[:, -1] the log popularity
    search_steps: int  # SEARCH_WAYS-ary search steps that find a place in any row's events


def split_time(seconds) -> np.ndarray:
    """[..., 2] int32 (day, second of the day) of Unix seconds (negative: days before 1970)."""
    s = np.asarray(seconds, np.int64)
    return np.stack([s // DAY, s % DAY], -1).astype(np.int32)


def device_tables(tables: RankerTables) -> tuple[dict, DeviceLayout]:
    """The arrays `device_ranker_inputs` reads (numpy, to be placed on a device once) and their
    layout. Item columns are packed so that a candidate row is one gather per dtype:
      item_floats [V, D + G + 1]: vector, genres, log popularity;
      item_ints [V, 5]: year bucket, its events' segment [start, end) in event_times, and the
        (day, second) of its first event;
      event_times [E + 1, 2]: every row's events as (day, second), each segment sorted by time
        (as ItemTimeline's keys are), then one sentinel so that no search step reads past it;
      user_features [U, F].
    """
    tl = tables.timeline
    num_rows, dim = tables.item_vectors.shape
    if len(tl.keys_E) >= np.iinfo(np.int32).max:
        raise ValueError(f"ranker timeline: {len(tl.keys_E)} events do not fit int32 offsets")
    rows_E = tl.keys_E >> _TIME_BITS
    times_E = (tl.keys_E & ((1 << _TIME_BITS) - 1)) + tl.t0
    offsets_V1 = np.searchsorted(rows_E, np.arange(num_rows + 1))
    never_V = tl.first_time_V == np.iinfo(np.int64).max
    first_Vx2 = np.where(never_V[:, None], np.asarray(_NEVER, np.int32),
                         split_time(np.where(never_V, 0, tl.first_time_V)))
    floats = np.concatenate([tables.item_vectors, tables.item_genres,
                             tables.item_logpop[:, None]], 1).astype(np.float32)
    ints = np.concatenate([tables.item_year[:, None], offsets_V1[:-1, None],
                           offsets_V1[1:, None], first_Vx2], 1).astype(np.int32)
    arrays = {"item_floats": floats, "item_ints": ints,
              "event_times": np.concatenate([split_time(times_E), [_NEVER]]).astype(np.int32),
              "user_features": tables.user_features}
    longest, steps = int(np.diff(offsets_V1).max(initial=0)), 0
    if longest * SEARCH_WAYS >= np.iinfo(np.int32).max:  # the search's pivot arithmetic
        raise ValueError(f"ranker timeline: a row with {longest} events is beyond int32 search")
    while SEARCH_WAYS ** steps <= longest:
        steps += 1
    return arrays, DeviceLayout(dim, tables.item_genres.shape[1], steps)


def device_ranker_inputs(t: dict, layout: DeviceLayout, q_BxD, user_B, history_BxL, time_Bx2,
                         last_time_Bx2, cand_BxN) -> dict:
    """`ranker_inputs` in jax.numpy, for use inside jit: the same dict (input_spec's names and
    dtypes) with the same values to float tolerance, read from `device_tables`' arrays `t`.

    Args:
      time_Bx2: `split_time` of the request times.
      last_time_Bx2: `split_time` of each user's latest history event (negative: unknown).
    """
    f32 = jnp.float32
    d, g = layout.dim, layout.num_genres
    # Per request: history, its vectors and genre profile, context.
    mask_BxL = history_BxL > 0
    length_B = mask_BxL.sum(1)
    known_B = last_time_Bx2[:, 0] >= 0
    gap_days_B = jnp.where(known_B, jnp.maximum(_days_between(time_Bx2, last_time_Bx2), 0), 0)
    hist_BxLxI = t["item_floats"][history_BxL]
    history_genres_BxG = hist_BxLxI[..., d:d + g].sum(1) / jnp.maximum(length_B, 1)[:, None]
    # Per candidate: popularity in trailing windows (events before the request time), age.
    floats_BxNxI, ints_BxNx5 = t["item_floats"][cand_BxN], t["item_ints"][cand_BxN]
    windows_K = jnp.asarray((0, *WINDOWS_DAYS), jnp.int32)
    bounds_BxKx2 = jnp.stack([time_Bx2[:, :1] - windows_K,
                              jnp.broadcast_to(time_Bx2[:, 1:], (len(time_Bx2), len(windows_K)))],
                             -1)
    before_BxNxK = _events_before(t["event_times"], ints_BxNx5[..., 1], ints_BxNx5[..., 2],
                                  bounds_BxKx2, layout.search_steps)
    counts_BxNxW = before_BxNxK[..., :1] - before_BxNxK[..., 1:]
    first_BxNx2 = ints_BxNx5[..., 3:]
    time_BxNx2 = jnp.broadcast_to(time_Bx2[:, None, :], first_BxNx2.shape)
    known_BxN = _earlier(first_BxNx2, time_BxNx2)
    age_days_BxN = jnp.where(known_BxN, _days_between(time_BxNx2, first_BxNx2), 0)
    stats_BxNxS = jnp.concatenate(
        [floats_BxNxI[..., -1:], jnp.log1p(counts_BxNxW.astype(f32)),
         jnp.log1p(age_days_BxN)[..., None], known_BxN[..., None].astype(f32)], -1)
    year_BxN = ints_BxNx5[..., 0]
    gap_BxN = _year_bucket(time_Bx2)[:, None] - year_BxN
    gap_BxN = jnp.where(year_BxN == 0, 0, jnp.where(gap_BxN < 0, 1, jnp.minimum(
        gap_BxN + 2, GAP_BUCKETS - 1)))
    out = {"q": q_BxD, "user": user_B, "user_feats": t["user_features"][user_B],
           "history": history_BxL, "h": hist_BxLxI[..., :d], "history_genres": history_genres_BxG,
           "context": jnp.stack([jnp.log1p(length_B.astype(f32)), jnp.log1p(gap_days_B),
                                 known_B.astype(f32)], axis=1),
           "item": cand_BxN, "c": floats_BxNxI[..., :d], "item_genres": floats_BxNxI[..., d:d + g],
           "item_year": year_BxN, "year_gap": gap_BxN, "item_stats": stats_BxNxS}
    out["item_sims"] = similarities(out, jnp)
    spec = input_spec(0, 0, 0, 0)  # only the dtypes are read
    return {k: jnp.asarray(v, spec[k][0]) for k, v in out.items()}


def _days_between(later_Xx2, earlier_Xx2):
    """(later - earlier) in days, float32, of (day, second) pairs [..., 2]."""
    diff = later_Xx2 - earlier_Xx2
    return diff[..., 0].astype(jnp.float32) + diff[..., 1].astype(jnp.float32) / DAY


def _earlier(a_Xx2, b_Xx2):
    """a < b for (day, second) pairs [..., 2]."""
    return (a_Xx2[..., 0] < b_Xx2[..., 0]) | ((a_Xx2[..., 0] == b_Xx2[..., 0])
                                               & (a_Xx2[..., 1] < b_Xx2[..., 1]))


def _events_before(events_Ex2, starts_BxN, ends_BxN, bounds_BxKx2, steps: int):
    """[B, N, K] events in each candidate's segment [start, end) of `events_Ex2` (sorted)
    earlier than each of its request's K bounds.

    A SEARCH_WAYS-ary search: each step compares the events at the W - 1 pivots
    lo + j * m // W (j = 1 .. W - 1) of the remaining range [lo, lo + m) with the bound and keeps
    the part between the last pivot before it and the first one not before it, so the range
    shrinks to at most m // W (empty after `steps`).
    """
    w = SEARCH_WAYS
    shape = (*starts_BxN.shape, bounds_BxKx2.shape[1])
    lo = jnp.broadcast_to(starts_BxN[..., None], shape)
    hi = jnp.broadcast_to(ends_BxN[..., None], shape)
    bound_BxNxKx1x2 = bounds_BxKx2[:, None, :, None, :]
    j_P = jnp.arange(1, w, dtype=jnp.int32)
    for _ in range(steps):
        m = hi - lo
        pivots_P = lo[..., None] + j_P * m[..., None] // w  # in [lo, hi) when m > 0
        below_P = _earlier(events_Ex2[pivots_P], bound_BxNxKx1x2) & (m[..., None] > 0)
        c = below_P.sum(-1, dtype=jnp.int32)  # pivots before the bound: a prefix (sorted)
        lo, hi = (jnp.where(c > 0, lo + c * m // w + 1, lo),
                  jnp.where(c < w - 1, lo + (c + 1) * m // w, hi))
    return lo - starts_BxN[..., None]


def _year_bucket(time_Bx2):
    """`recsys.features.year_bucket_of_time` of (day, second) pairs, exactly, in int32: a
    Gregorian year of 365.2425 days is 216 x 146097 seconds, and a day 216 x 400."""
    years_B = 1970 + (time_Bx2[:, 0] * 400 + time_Bx2[:, 1] // 216) // 146097
    return jnp.where(years_B > 0, jnp.clip((years_B - 1900) // 5 + 1, 1, NUM_YEAR_BUCKETS - 1),
                     0)


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
