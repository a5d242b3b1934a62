"""Request validation: raw request dicts to typed requests, each bad field named in a RequestError."""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

# Every field a request may carry (see docs/serving.md).
FIELDS = ("user_id", "history", "k", "exclude", "exclude_seen", "filters", "time", "ordering",
          "mmr_lambda", "genre_cap", "temperature", "seed")
ORDERINGS = ("topk", "mmr", "explore")
FILTER_FIELDS = ("genres_not", "genres_any", "year_min", "year_max")


class RequestError(ValueError):
    """A bad request; `field` names the offending argument (e.g. "k", "filters.year_min")."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class Policy:
    """Stage-4 ordering options of one request."""

    ordering: str  # topk | mmr | explore
    mmr_lambda: float  # relevance weight of MMR in [0, 1]
    genre_cap: int  # most items per genre (0 = no cap)
    temperature: float  # explore softmax temperature (> 0)
    seed: int  # explore sampling seed


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated request, in vocabulary rows."""

    user_row: int  # 0 when unknown or absent
    history_rows: np.ndarray  # [n] item rows, oldest first (unknown ids removed)
    last_time: float  # time of the latest stored history event (-1 when none is known)
    seen_rows: np.ndarray  # rows excluded as seen
    exclude_rows: np.ndarray  # rows excluded by the request
    filters: dict  # validated item-attribute rules
    time: float  # request time, seconds
    k: int
    policy: Policy
    unknown: list  # request ids not in the vocabularies
    cold: bool  # neither a known user nor a known history item


def check_id(field: str, value) -> None:
    """Raw ids are str or int (numpy ints too); floats, NaN, bools and None are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
        raise RequestError(field, f"ids must be str or int, got {value!r} ({type(value).__name__})")


def id_list(field: str, value) -> list:
    """A list/tuple/set/array of raw ids (a lone str or int is refused: wrap it in a list)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple, set,
                                                                        frozenset, np.ndarray)):
        raise RequestError(field, f"expected a list of item ids, got {type(value).__name__}")
    value = list(value.tolist() if isinstance(value, np.ndarray) else value)
    for v in value:
        check_id(field, v)
    return value


def positive_int(field: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise RequestError(field, f"must be a positive int, got {value!r}")
    return int(value)


def number(field: str, value, lo: float, hi: float = math.inf, *, open_lo: bool = False) -> float:
    """A finite real in [lo, hi] ((lo, hi] with open_lo)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise RequestError(field, f"must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v > hi or v < lo or (open_lo and v == lo):
        bound = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
        raise RequestError(field, f"must be a finite number in {bound}, got {value!r}")
    return v


def parse_policy(r: dict, defaults: Policy) -> Policy:
    ordering = r.get("ordering", defaults.ordering)
    if ordering not in ORDERINGS:
        raise RequestError("ordering", f"must be one of {', '.join(ORDERINGS)}, got {ordering!r}")
    lam = number("mmr_lambda", r.get("mmr_lambda", defaults.mmr_lambda), 0.0, 1.0)
    cap = r.get("genre_cap", defaults.genre_cap)
    if cap != 0:
        cap = positive_int("genre_cap", cap)
    temp = number("temperature", r.get("temperature", defaults.temperature), 0.0, open_lo=True)
    seed = r.get("seed", defaults.seed)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise RequestError("seed", f"must be an int >= 0, got {seed!r}")
    return Policy(ordering, lam, int(cap), temp, int(seed))


def parse_filters(filters, genre_names: tuple[str, ...]) -> dict:
    """{"genres_not": [names], "genres_any": [names], "year_min": int, "year_max": int}."""
    if filters is None:
        return {}
    if not isinstance(filters, dict):
        raise RequestError("filters", f"expected a dict, got {type(filters).__name__}")
    out = {}
    for name, value in filters.items():
        field = f"filters.{name}"
        if name not in FILTER_FIELDS:
            raise RequestError(field, f"unknown filter; known: {', '.join(FILTER_FIELDS)}")
        if name.startswith("genres"):
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set)):
                raise RequestError(field, f"expected a list of genre names, got {value!r}")
            unknown = [g for g in value if g not in genre_names]
            if unknown:
                raise RequestError(field, f"unknown genre(s) {unknown}; known: {list(genre_names)}")
            out[name] = tuple(value)
        else:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise RequestError(field, f"must be an int year, got {value!r}")
            out[name] = int(value)
    return out
