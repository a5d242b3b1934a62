"""Request validation: raw request dicts to typed requests, each bad field named in a RequestError.

Every range is checked on the Python value, before anything becomes a numpy number, so no
input can overflow later; ids follow the one rule of `recsys.data.vocab`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import TYPE_CHECKING, Literal

import numpy as np

from recsys import config as config_lib
from recsys.config import ConfigError, ServeConfig

if TYPE_CHECKING:
    from recsys.serve.artifacts import Loaded

# Every field a request may carry (see docs/serving.md); a field set to None is a field left out.
FIELDS = ("user_id", "history", "k", "exclude", "exclude_seen", "filters", "time", "ordering",
          "mmr_lambda", "genre_cap", "temperature", "seed")
ORDERINGS = ("topk", "mmr", "explore")
FILTER_FIELDS = ("genres_not", "genres_any", "year_min", "year_max")
BATCH_BUCKETS = (1, 8, 64, 256)  # request batches are padded to these sizes: no recompiles
INT32_MAX = 2**31 - 1
MAX_YEAR = 9999  # year rules, as in ServeConfig.filter_year_*
# The query tower counts time in int32 minutes (recsys.data.batches.time_context): ~ year 6053.
MAX_TIME = INT32_MAX * 60


_CONFIG_NAMES = {"temperature": "explore_temperature"}  # request field -> ServeConfig field


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
    time: float  # request time, seconds in [0, MAX_TIME]
    k: int
    policy: Policy
    unknown: list  # request ids not in the vocabularies (user, then history, then exclude)
    cold: bool  # neither a known user nor a known history item


class RequestParser:
    """Turns raw request dicts into `Request`s against one artifacts directory's vocabularies,
    stored histories and the serve config's defaults."""

    def __init__(self, loaded: Loaded, cfg: ServeConfig, genre_names: tuple[str, ...],
                 default_time: int):
        self._items, self._users = loaded.items, loaded.users
        self._offsets, self._stored = loaded.history_offsets, loaded.history_items
        has = np.diff(self._offsets) > 0
        self._last_time_U = np.full(len(self._offsets) - 1, -1, np.int64)
        self._last_time_U[has] = loaded.history_times[self._offsets[1:][has] - 1]
        self._genre_names = genre_names
        self._default_time = default_time
        self._exclude_seen = cfg.exclude_seen
        # The defaults pass the request rules too, so no request fails for the config's sake.
        try:
            self._policy = parse_policy({}, Policy(cfg.ordering, cfg.mmr_lambda, cfg.genre_cap,
                                                   cfg.explore_temperature, 0))
            self._filters = parse_filters(cfg.filters(), genre_names)
        except RequestError as e:
            name = _CONFIG_NAMES.get(e.field, e.field.replace("filters.", "filter_"))
            raise ConfigError(f"serve.{name}: {str(e).split(': ', 1)[1]}") from None

    def parse(self, r) -> Request:
        """One request dict (fields: FIELDS) to a Request; raises RequestError naming a field."""
        if not isinstance(r, dict):
            raise RequestError("requests", f"each request must be a dict, got {type(r).__name__}")
        unknown_keys = sorted(map(str, set(r) - set(FIELDS)))
        if unknown_keys:
            raise RequestError(unknown_keys[0], f"unknown request field; known: {', '.join(FIELDS)}")
        r = {name: value for name, value in r.items() if value is not None}
        k = int_in("k", r.get("k", 10), 1, INT32_MAX)
        unknown, user_row = [], 0
        if "user_id" in r:
            user_id = check_id("user_id", r["user_id"])
            user_row = int(self._users.lookup([user_id])[0])
            if user_row == 0:
                unknown.append(user_id)
        stored = self._stored[self._offsets[user_row]:self._offsets[user_row + 1]]
        last_time = self._last_time_U[user_row]
        history_rows = stored
        if "history" in r:
            history = id_list("history", r["history"])
            rows = self._items.lookup(history) if history else np.zeros(0, np.int32)
            unknown += [h for h, row in zip(history, rows) if row == 0]
            history_rows = rows[rows > 0]
            last_time = -1 if len(history_rows) else last_time
        exclude = id_list("exclude", r.get("exclude"))
        exclude_rows = self._items.lookup(exclude) if exclude else np.zeros(0, np.int32)
        unknown += [x for x, row in zip(exclude, exclude_rows) if row == 0]
        exclude_seen = r.get("exclude_seen", self._exclude_seen)
        if not isinstance(exclude_seen, (bool, np.bool_)):
            raise RequestError("exclude_seen", f"must be a bool, got {exclude_seen!r}")
        seen = np.union1d(stored, history_rows) if exclude_seen else np.zeros(0, np.int32)
        filters = {**self._filters, **parse_filters(r.get("filters"), self._genre_names)}
        when = number("time", r["time"], 0.0, MAX_TIME) if "time" in r else self._default_time
        return Request(user_row, np.asarray(history_rows), float(last_time), seen,
                       exclude_rows[exclude_rows > 0], filters, when, k,
                       parse_policy(r, self._policy), unknown,
                       cold=user_row == 0 and len(history_rows) == 0)


def serve_config(stored: dict, overrides: dict) -> ServeConfig:
    """The artifacts' stored serve config (a manifest's "serve" dict) with `Recommender.load`'s
    overrides. Each override must be a ServeConfig field of the field's type; ServeConfig then
    checks every value as it is built. Raises ConfigError naming the field."""
    if stored.get("filters"):
        raise ConfigError("serve.filters: these artifacts store item rules as JSON, which the "
                          "serve.filter_* fields replaced; re-export them")
    hints = typing.get_type_hints(ServeConfig)
    fields = [f.name for f in dataclasses.fields(ServeConfig)]
    for name in overrides:
        if name not in fields:
            raise ConfigError(f"serve.{name}: unknown ServeConfig field; known: {', '.join(fields)}")
    typed = {name: _option(name, value, hints[name]) for name, value in overrides.items()}
    return dataclasses.replace(config_lib.from_dict({"serve": stored}).serve, **typed)


def _option(name: str, value, hint):
    """value as a ServeConfig field of type `hint` (ints may stand for floats, lists for tuples)."""
    origin = typing.get_origin(hint)
    ok = {bool: lambda v: isinstance(v, (bool, np.bool_)),
          int: lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)),
          float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)),
          str: lambda v: isinstance(v, str)}
    if origin is Literal:  # ServeConfig checks the choices
        return value
    if origin is tuple and isinstance(value, (list, tuple)) and all(ok[str](v) for v in value):
        return tuple(value)
    if origin is None and hint in ok and ok[hint](value):
        try:
            return hint(value.item() if isinstance(value, np.generic) else value)
        except OverflowError:  # an int beyond any float
            pass
    raise ConfigError(f"serve.{name}={value!r}: must be of type "
                      f"{getattr(hint, '__name__', hint)}")


def check_id(field: str, value):
    """Raw ids are str or int (numpy ints too); floats, NaN, bools and None are refused.
    Returns the id as a plain Python value."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
        raise RequestError(field, f"ids must be str or int, got {value!r} ({type(value).__name__})")
    return value.item() if isinstance(value, np.generic) else value


def id_list(field: str, value) -> list:
    """A list/tuple/set/array of raw ids (a lone str or int is refused: wrap it in a list)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple, set,
                                                                        frozenset, np.ndarray)):
        raise RequestError(field, f"expected a list of item ids, got {type(value).__name__}")
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise RequestError(field, f"expected a 1-d array of item ids, got shape {value.shape}")
    return [check_id(field, v) for v in (value.tolist() if isinstance(value, np.ndarray)
                                         else value)]


def int_in(field: str, value, lo: int, hi: int) -> int:
    """A Python or numpy int (not a bool) in [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise RequestError(field, f"must be an int in [{lo}, {hi}], got {value!r}")
    if not lo <= int(value) <= hi:
        raise RequestError(field, f"must be an int in [{lo}, {hi}], got {value!r}")
    return int(value)


def number(field: str, value, lo: float, hi: float = math.inf, *, open_lo: bool = False) -> float:
    """A finite real in [lo, hi] ((lo, hi] with open_lo)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise RequestError(field, f"must be a number, got {value!r}")
    try:
        v = float(value)
    except OverflowError:  # an int or fraction beyond any float
        v = math.inf
    if not math.isfinite(v) or v > hi or v < lo or (open_lo and v == lo):
        bound = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
        raise RequestError(field, f"must be a finite number in {bound}, got {value!r}")
    return v


def parse_policy(r: dict, defaults: Policy) -> Policy:
    """Stage-4 options of a request (fields absent or None take the defaults)."""
    ordering = r.get("ordering", defaults.ordering)
    if not isinstance(ordering, str) or ordering not in ORDERINGS:
        raise RequestError("ordering", f"must be one of {', '.join(ORDERINGS)}, got {ordering!r}")
    lam = number("mmr_lambda", r.get("mmr_lambda", defaults.mmr_lambda), 0.0, 1.0)
    cap = int_in("genre_cap", r.get("genre_cap", defaults.genre_cap), 0, INT32_MAX)
    temp = number("temperature", r.get("temperature", defaults.temperature), 0.0, open_lo=True)
    seed = int_in("seed", r.get("seed", defaults.seed), 0, 2**63 - 1)
    return Policy(ordering, lam, cap, temp, seed)


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
            unknown = [g for g in value if not isinstance(g, str) or g not in genre_names]
            if unknown:
                raise RequestError(field, f"unknown genre(s) {unknown}; known: {list(genre_names)}")
            out[name] = tuple(value)
        else:
            out[name] = int_in(field, value, 0, MAX_YEAR)
    return out


def bucket(b: int) -> int:
    """The smallest batch bucket holding b requests."""
    for size in BATCH_BUCKETS:
        if b <= size:
            return size
    raise ValueError(f"batch of {b} is above the largest bucket {BATCH_BUCKETS[-1]}")


def pad(x, size: int, fill=0) -> np.ndarray:
    """x [b, ...] padded with `fill` rows to [size, ...]."""
    x = np.asarray(x)
    out = np.full((size, *x.shape[1:]), fill, x.dtype)
    out[:len(x)] = x
    return out
