"""Reads a team's own events (Parquet or CSV: a file, a directory or a glob) and optional item and
user feature tables into RawData (data.source=events), vectorised with pyarrow."""

from __future__ import annotations

import dataclasses
import glob
import logging
import pathlib

import numpy as np

from recsys.config import DataConfig
from recsys.data.columnar import (
    Rows,
    align_ids,
    first_true,
    is_text,
    parse_ids,
    parse_seconds,
    plain,
    read_files,
    require_pyarrow,
    to_numpy,
    valid,
    value_repr,
)
from recsys.data.schema import DataError, ItemInfo, RawData, UserInfo

# An item string column with more distinct values is left out of the genre block (each value
# becomes a column of the [V, G] multi-hot, so free text and id-like columns do not fit).
MAX_ITEM_VALUES = 1000
_TITLE_YEAR = r"\((?P<year>\d{4})(?:\s*[-–]\s*\d{0,4})?\)\s*$"  # as the MovieLens reader
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FeatureColumn:
    """One column of a feature table, converted by its type.

    Attributes:
      name: the column's name in the file.
      kind: "categorical" (one string or bool per row), "multi" (strings split on
        data.multi_value_separator, or a list<string> column) or "numeric" (ints and floats).
      values: categorical [N] int32 codes 1..len(vocabulary), 0 = missing; multi [N, K] bool;
        numeric [N] float32 standardised (mean 0, std 1 over present values; missing = 0).
      vocabulary: the sorted values (categorical: code k + 1 is vocabulary[k]; multi: column k).
    """

    name: str
    kind: str
    values: np.ndarray
    vocabulary: tuple[str, ...] = ()


def read(cfg: DataConfig) -> RawData:
    """Reads the events `cfg.path` names, plus the item and user tables when configured.

    Rows without a user or item id or with an unparsable timestamp are counted, reported in one
    warning line and dropped; more than `cfg.max_bad_fraction` of them stops the run.

    Returns:
      RawData whose ids are int64 when every id of a column is a canonical int, else str; events
      in file order (files sorted by name); the catalogue from the item table (else the items
      seen in events, without features).

    Raises:
      DataError: naming the file, column and row of the first problem, or the pip command when
        pyarrow is missing.
    """
    require_pyarrow()
    if not cfg.path:
        raise DataError("data.path is required for data.source=events: a Parquet or CSV file, a "
                        "directory of them or a glob, e.g. --set data.path='events/*.parquet'")
    columns = {cfg.user_column: "data.user_column", cfg.item_column: "data.item_column",
               cfg.timestamp_column: "data.timestamp_column"}
    if cfg.weight_column:
        columns[cfg.weight_column] = "data.weight_column"
    table, rows, csv = read_files(cfg.path, "data.path", columns)
    users, user_ok = parse_ids(table[cfg.user_column], rows, cfg.user_column,
                               "data.user_column", csv)
    items, item_ok = parse_ids(table[cfg.item_column], rows, cfg.item_column,
                               "data.item_column", csv)
    times, time_ok = parse_seconds(table[cfg.timestamp_column], rows, cfg.timestamp_column)
    if cfg.weight_column:
        _check_weights(table[cfg.weight_column], rows, cfg.weight_column)
        _log.warning("data.weight_column=%r is checked but not used yet: every event counts",
                     cfg.weight_column)
    problems = {cfg.user_column: ~user_ok, cfg.item_column: ~item_ok,
                cfg.timestamp_column: ~time_ok}
    ok = _drop_bad_rows(table, rows, problems, cfg.max_bad_fraction, _name(cfg.path))
    users, items, times = users[ok], items[ok], times[ok]
    if len(times) and np.median(times) > 1e11:
        _log.warning("%s: timestamps look like milliseconds (median %d); they are read as "
                     "seconds", cfg.path, int(np.median(times)))
    catalogue = _read_items(cfg, items)
    items, catalogue_ids = align_ids(items, catalogue.ids)
    user_info = _read_users(cfg)
    if user_info is not None:
        users, user_table_ids = align_ids(users, user_info.ids)
        user_info = dataclasses.replace(user_info, ids=user_table_ids)
    return RawData(name=_name(cfg.path), user_ids=users, item_ids=items, timestamps=times,
                   items=dataclasses.replace(catalogue, ids=catalogue_ids), users=user_info)



def _name(path: str) -> str:
    """The dataset's name for reports: the file's stem, or the directory holding the files."""
    p = pathlib.Path(path)
    while glob.has_magic(str(p)) and p != p.parent:
        p = p.parent
    if p.is_file():
        return p.name.split(".")[0]
    return p.resolve().name or "events"


# -------------------------------------------------------------------------- event rows


def _check_weights(col, rows: Rows, name: str) -> None:
    """The weight column must be numeric (CSV: every present value parses as a number)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = plain(col)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return
    if pa.types.is_string(col.type):
        text = pc.utf8_trim_whitespace(col)
        try:
            text.cast(pa.float64())
            return
        except pa.ArrowInvalid:
            number = r"(?i)^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$|^[+-]?(nan|inf|infinity)$"
            bad = first_true(to_numpy(pc.invert(pc.match_substring_regex(text, number)), False))
            raise DataError(f"{rows.at(bad)}: column {name!r} (data.weight_column) holds "
                            f"{value_repr(col, bad)}; weights must be numbers") from None
    bad = first_true(valid(col))
    raise DataError(f"{rows.at(bad)}: column {name!r} (data.weight_column) has type {col.type}; "
                    f"weights must be numbers")


def _drop_bad_rows(table, rows: Rows, problems: dict[str, np.ndarray], max_fraction: float,
                   name: str) -> np.ndarray:
    """[R] bool rows to keep; reports the others in one line, or refuses too many of them."""
    bad = np.logical_or.reduce(list(problems.values()))
    n, n_bad = len(bad), int(bad.sum())
    if n == 0:
        raise DataError(f"{rows.files[0]}: no events")
    if not n_bad:
        return ~bad
    first = first_true(bad)
    column = next(c for c, m in problems.items() if m[first])
    counts = ", ".join(f"{c}: {int(m.sum())}" for c, m in problems.items() if m.any())
    what = (f"{name}: {n_bad} of {n} event rows ({n_bad / n:.2%}) cannot be used (missing id or "
            f"unparsable timestamp; {counts}); first: {rows.at(first)}, column {column!r} = "
            f"{value_repr(table[column], first)}")
    if n_bad > max_fraction * n:
        raise DataError(f"{what}; more than data.max_bad_fraction={max_fraction}")
    _log.warning("%s; dropped (data.max_bad_fraction=%s)", what, max_fraction)
    return ~bad


# ---------------------------------------------------------------------- feature tables


def read_feature_table(pattern: str, key_column: str, config_key: str, separator: str,
                       special: tuple[str, ...] = ()):
    """Reads an item or user table keyed by `key_column`.

    Returns:
      (ids [N], special, columns): unique raw ids; the `special` columns the file has, as
      pyarrow columns (CSV: typed by `_typed`); every other column converted (`FeatureColumn`),
      except columns of other types (dates, structs, ...), which are logged.

    Raises:
      DataError: naming the file, column and row of a missing or repeated id or a bad column.
    """
    table, rows, csv = read_files(pattern, config_key, None)
    if key_column not in table.column_names:
        id_key = config_key.replace("features_path", "column")
        raise DataError(f"{rows.files[0]}: no column {key_column!r} (the id column, {id_key}); "
                        f"columns: {', '.join(table.column_names)}")
    ids, ok = parse_ids(table[key_column], rows, key_column, config_key, csv)
    if not ok.all():
        raise DataError(f"{rows.at(first_true(~ok))}: column {key_column!r} has no id")
    order = np.argsort(ids, kind="stable")
    again = order[1:][ids[order][1:] == ids[order][:-1]]
    if len(again):
        i = int(again.min())
        raise DataError(f"{rows.at(i)}: column {key_column!r}: id {ids[i].item()!r} appears "
                        f"more than once")
    found = {c: _special(table[c], rows, c, csv) for c in special if c in table.column_names}
    columns, unused = [], []
    for name in table.column_names:
        if name == key_column or name in found:
            continue
        column = _feature_column(_typed(table[name], csv), name, separator)
        if column is None:
            unused.append(f"{name} ({table[name].type})")
        else:
            columns.append(column)
    if unused:
        _log.warning("%s: columns of unsupported types not used: %s", pattern, ", ".join(unused))
    return ids, found, columns


def _special(col, rows: Rows, name: str, csv: bool) -> np.ndarray:
    """"title": [N] str (trimmed, missing = ""); "year": [N] int32 (missing = 0)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if name == "title":
        text = pc.utf8_trim_whitespace(plain(col).cast(pa.string()))
        return to_numpy(text, "").astype(str)
    typed = _typed(col, csv)
    if not (pa.types.is_integer(typed.type) or pa.types.is_floating(typed.type)):
        bad = np.ones(len(col), bool)
        if pa.types.is_string(typed.type):
            bad = pc.invert(pc.match_substring_regex(typed, r"^-?\d+(\.0*)?$"))
            bad = to_numpy(bad, False)
        i = first_true(bad & valid(col))
        raise DataError(f"{rows.at(i)}: column {name!r} holds {value_repr(col, i)} (type "
                        f"{col.type}); years must be integers")
    y = to_numpy(typed.cast(pa.float64()))
    return np.where(np.isfinite(y), y, 0).astype(np.int32)


def _typed(col, csv: bool):
    """CSV text columns as int64 or float64 when every present value parses; trimmed text else."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = plain(col)
    if not csv:
        return col
    col = pc.utf8_trim_whitespace(col)
    col = pc.if_else(pc.equal(pc.utf8_length(col), 0), None, col)
    for target in (pa.int64(), pa.float64()):
        try:
            return col.cast(target)
        except pa.ArrowInvalid:
            pass
    return col


def _feature_column(col, name: str, separator: str) -> FeatureColumn | None:
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_boolean(t):
        col, t = col.cast(pa.string()), pa.string()
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        x = to_numpy(col.cast(pa.float64()))  # missing -> NaN
        ok = np.isfinite(x)
        mean = x[ok].mean() if ok.any() else 0.0
        std = x[ok].std() if ok.any() else 0.0
        z = np.where(ok, (x - mean) / (std if std > 0 else 1.0), 0.0)
        return FeatureColumn(name, "numeric", z.astype(np.float32))
    if pa.types.is_string(t) and not pc.any(pc.match_substring(col, separator)).as_py():
        vocab = np.sort(to_numpy(pc.unique(col).drop_null()).astype(str))
        codes = pc.index_in(col, value_set=pa.array(vocab, pa.string()))
        return FeatureColumn(name, "categorical", (to_numpy(codes, -1) + 1)
                             .astype(np.int32), tuple(vocab.tolist()))
    if pa.types.is_string(t):
        lists = pc.split_pattern(col, separator)
    elif (pa.types.is_list(t) or pa.types.is_large_list(t)) and is_text(t.value_type):
        lists = col
    else:
        return None
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    parts = pc.utf8_trim_whitespace(plain(pc.list_flatten(lists)))
    parent = to_numpy(pc.list_parent_indices(lists))
    keep = to_numpy(pc.greater(pc.utf8_length(parts), 0), False)
    parts = to_numpy(parts)[keep].astype(str)
    vocab, codes = np.unique(parts, return_inverse=True)
    hot = np.zeros((len(col), len(vocab)), bool)
    hot[parent[keep], codes] = True
    return FeatureColumn(name, "multi", hot, tuple(vocab.tolist()))


def _read_items(cfg: DataConfig, event_items: np.ndarray) -> ItemInfo:
    """The catalogue: the item table mapped onto ItemInfo, or the items seen in events."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not cfg.item_features_path:
        ids = np.unique(event_items)
        return ItemInfo(ids=ids, genres=np.zeros((len(ids), 0), bool), genre_names=(),
                        year=np.zeros(len(ids), np.int32))
    ids, special, columns = read_feature_table(cfg.item_features_path, cfg.item_column,
                                               "data.item_features_path",
                                               cfg.multi_value_separator, ("title", "year"))
    titles = special.get("title")
    year = special.get("year", np.zeros(len(ids), np.int32))
    if "year" not in special and titles is not None:
        found = pc.struct_field(pc.extract_regex(pa.array(titles, pa.string()), _TITLE_YEAR),
                                "year")
        year = to_numpy(found.cast(pa.int32()), 0)
    blocks, names, unused = [], [], []
    for c in columns:
        if c.kind == "numeric" or len(c.vocabulary) > MAX_ITEM_VALUES:
            unused.append(f"{c.name} ({c.kind}, {len(c.vocabulary)} values)" if c.vocabulary
                          else f"{c.name} ({c.kind})")
            continue
        hot = c.values if c.kind == "multi" else np.eye(len(c.vocabulary) + 1, dtype=bool)[
            c.values][:, 1:]
        blocks.append(hot)
        names += [v if c.name == "genres" else f"{c.name}={v}" for v in c.vocabulary]
    if unused:
        _log.warning("%s: item columns read but not used yet: %s", cfg.item_features_path,
                     ", ".join(unused))
    genres = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(ids), 0), bool)
    return ItemInfo(ids=ids, genres=genres, genre_names=tuple(names), year=year, titles=titles)


def _read_users(cfg: DataConfig) -> UserInfo | None:
    """The user table's categorical columns as UserInfo (None without a table or such columns)."""
    if not cfg.user_features_path:
        return None
    ids, _, columns = read_feature_table(cfg.user_features_path, cfg.user_column,
                                         "data.user_features_path", cfg.multi_value_separator)
    used = [c for c in columns if c.kind == "categorical"]
    unused = [f"{c.name} ({c.kind})" for c in columns if c.kind != "categorical"]
    if unused:
        _log.warning("%s: user columns read but not used yet: %s", cfg.user_features_path,
                     ", ".join(unused))
    if not used:
        return None
    return UserInfo(ids=ids, features=np.stack([c.values for c in used], axis=1),
                    feature_names=tuple(c.name for c in used),
                    cardinalities=tuple(len(c.vocabulary) + 1 for c in used))
