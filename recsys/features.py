"""Model input contracts shared by data, training, export and serving: names, dtypes, shapes, order.

A spec maps an input name to (numpy dtype, symbolic shape), the shape a string of comma-separated
dimensions that are ints or the letters "b" (requests) and "n" (candidates per request), as
`jax.export.symbolic_shape` reads them. Row 0 of every item and user table is padding / unknown.
"""

from __future__ import annotations

import numpy as np

from recsys.config import NUM_YEAR_BUCKETS

DAY = 86_400  # seconds
TIME_CONTEXT = "time_context"  # the query tower's optional input (model.time_features)


# ---- rows ----------------------------------------------------------------------------------


def valid_rows(num_rows: int) -> np.ndarray:
    """[num_rows] bool: every row but the padding row 0 (what an index may return)."""
    mask = np.ones(num_rows, bool)
    mask[0] = False
    return mask


# ---- years and times -----------------------------------------------------------------------


def year_bucket(year: np.ndarray) -> np.ndarray:
    """5-year buckets of release years (1900-1904 is 1, ...; clipped), 0 where unknown (<= 0)."""
    year = np.asarray(year)
    bucket = np.clip((year - 1900) // 5 + 1, 1, NUM_YEAR_BUCKETS - 1)
    return np.where(year > 0, bucket, 0).astype(np.int32)


def year_bucket_of_time(time_B: np.ndarray) -> np.ndarray:
    """The `year_bucket` of the calendar year of Unix times in seconds: [B] int32."""
    years = 1970 + np.asarray(time_B, np.float64) / (365.2425 * DAY)
    return year_bucket(years.astype(np.int64))


def time_context(request_seconds_B: np.ndarray, previous_seconds_B: np.ndarray) -> np.ndarray:
    """[B, 2] int32 minutes since 1970: the request time and the user's previous event (-1: none).

    The query tower turns these into its time features (model.time_features); training passes
    the event's own time and the event before it, serving the request time and the user's latest
    stored event.
    """
    prev_B = np.asarray(previous_seconds_B, np.int64)
    return np.stack([np.asarray(request_seconds_B, np.int64) // 60,
                     np.where(prev_B >= 0, prev_B // 60, -1)], axis=1).astype(np.int32)


# ---- the query tower -----------------------------------------------------------------------


def query_input_spec(history_len: int, num_user_features: int, time_features: bool) -> dict:
    """name -> (dtype, symbolic shape) of what the query tower reads for b queries."""
    spec = {"user": (np.int32, "b"), "history": (np.int32, f"b, {history_len}"),
            "user_feats": (np.int32, f"b, {num_user_features}")}
    if time_features:
        spec[TIME_CONTEXT] = (np.int32, "b, 2")
    return spec


def query_inputs(user_features_UxF: np.ndarray, user_B: np.ndarray, history_BxL: np.ndarray,
                 time_context_Bx2: np.ndarray | None = None) -> dict:
    """The query tower's input dict (`query_input_spec`) for B queries.

    Args:
      user_features_UxF: the user feature table; row 0 (unknown user) is all zeros.
      user_B: user rows; history_BxL: item rows, oldest first, 0-padded on the left.
      time_context_Bx2: see `time_context`; only for towers with model.time_features.
    """
    user_B = np.asarray(user_B, np.int32)
    out = {"user": user_B, "history": np.asarray(history_BxL, np.int32),
           "user_feats": user_features_UxF[user_B]}
    if time_context_Bx2 is not None:
        out[TIME_CONTEXT] = np.asarray(time_context_Bx2, np.int32)
    return out


# ---- the ranker's numeric features ---------------------------------------------------------


def ranker_numeric(x: dict, xp=np):
    """[B, N, S + C + K]: the ranker features its model standardises, in this order: item_sims
    [B, N, S], item_stats [B, N, C], then the request's context [B, K] repeated per candidate.

    `xp` is numpy (statistics, in recsys.models.ranker_inputs) or jax.numpy (the model).
    """
    b, n = x["item"].shape
    context_BxNxK = xp.broadcast_to(x["context"][:, None, :], (b, n, x["context"].shape[-1]))
    return xp.concatenate([x["item_sims"], x["item_stats"], context_BxNxK], -1)


# ---- specs ---------------------------------------------------------------------------------


def shape_of(spec_shape: str, b: int, n: int = 1) -> tuple[int, ...]:
    """A spec's symbolic shape with "b" and "n" bound: ("b, n, 4", 8, 200) -> (8, 200, 4)."""
    sizes = {"b": b, "n": n}
    return tuple(sizes[d] if d in sizes else int(d) for d in spec_shape.replace(" ", "").split(","))


def zeros_from_spec(spec: dict, b: int, n: int = 1) -> dict:
    """All-zero inputs of a spec for b requests of n candidates (warm-up and shape examples)."""
    return {k: np.zeros(shape_of(shape, b, n), dtype) for k, (dtype, shape) in spec.items()}
