"""Reads a team's own events (Parquet or CSV: a file, a directory or a glob) and optional item and
user feature tables into RawData (data.source=events), vectorised with pyarrow."""

from __future__ import annotations

import dataclasses
import glob
import logging
import pathlib

import numpy as np

from recsys.config import DataConfig
from recsys.data.schema import DataError, ItemInfo, RawData, UserInfo

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv",
           ".csv.bz2": "csv"}
# An item string column with more distinct values is left out of the genre block (each value
# becomes a column of the [V, G] multi-hot, so free text and id-like columns do not fit).
MAX_ITEM_VALUES = 1000
_INT = r"^-?\d{1,18}$"
_DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
_TIME = r"[T ]([01]\d|2[0-3])(:[0-5]\d(:[0-5]\d(\.\d{1,9})?)?)?"
_NAIVE = f"^{_DATE}({_TIME})?$"  # read as UTC
_ZONED = f"^{_DATE}{_TIME}(Z|[+-]([01]\\d|2[0-3])(:?[0-5]\\d)?)$"
_TITLE_YEAR = r"\((?P<year>\d{4})(?:\s*[-–]\s*\d{0,4})?\)\s*$"  # as the MovieLens reader
_UNIT_SECONDS = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
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


@dataclasses.dataclass(frozen=True)
class _Rows:
    """Maps a row of the concatenated table back to its file and 1-based data row."""

    files: tuple[pathlib.Path, ...]
    starts: np.ndarray  # [F + 1] first row of each file in the concatenated table

    def at(self, i: int) -> str:
        f = int(np.searchsorted(self.starts, i, "right")) - 1
        return f"{self.files[f]} row {i - int(self.starts[f]) + 1}"


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
    _require_pyarrow()
    if not cfg.path:
        raise DataError("data.path is required for data.source=events: a Parquet or CSV file, a "
                        "directory of them or a glob, e.g. --set data.path='events/*.parquet'")
    columns = {cfg.user_column: "data.user_column", cfg.item_column: "data.item_column",
               cfg.timestamp_column: "data.timestamp_column"}
    if cfg.weight_column:
        columns[cfg.weight_column] = "data.weight_column"
    table, rows, csv = _read_files(cfg.path, "data.path", columns)
    users, user_ok = _ids(table[cfg.user_column], rows, cfg.user_column, "data.user_column", csv)
    items, item_ok = _ids(table[cfg.item_column], rows, cfg.item_column, "data.item_column", csv)
    times, time_ok = _seconds(table[cfg.timestamp_column], rows, cfg.timestamp_column)
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
    items, catalogue_ids = _align(items, catalogue.ids)
    user_info = _read_users(cfg)
    if user_info is not None:
        users, user_table_ids = _align(users, user_info.ids)
        user_info = dataclasses.replace(user_info, ids=user_table_ids)
    return RawData(name=_name(cfg.path), user_ids=users, item_ids=items, timestamps=times,
                   items=dataclasses.replace(catalogue, ids=catalogue_ids), users=user_info)


def _require_pyarrow() -> None:
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.csv
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("data.source=events reads Parquet and CSV with pyarrow, which is not "
                        "installed: pip install 'recsys[events]'") from None


def _name(path: str) -> str:
    """The dataset's name for reports: the file's stem, or the directory holding the files."""
    p = pathlib.Path(path)
    while glob.has_magic(str(p)) and p != p.parent:
        p = p.parent
    if p.is_file():
        return p.name.split(".")[0]
    return p.resolve().name or "events"


# ------------------------------------------------------------------------------ files


def _files(pattern: str, key: str) -> list[pathlib.Path]:
    """The files a path, directory (its Parquet/CSV files) or glob names, sorted by name."""
    p = pathlib.Path(pattern)
    if glob.has_magic(pattern):
        files = sorted(pathlib.Path(f) for f in glob.glob(pattern, recursive=True)
                       if pathlib.Path(f).is_file())
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and _format(f))
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"{key}={pattern}: no such file or directory")
    if not files:
        raise DataError(f"{key}={pattern}: no Parquet or CSV files found")
    unknown = [f for f in files if not _format(f)]
    if unknown:
        raise DataError(f"{unknown[0]}: not a Parquet or CSV file name (expected "
                        f"{', '.join(FORMATS)})")
    if len({_format(f) for f in files}) > 1:
        raise DataError(f"{key}={pattern}: mixes Parquet and CSV files; use one format")
    return files


def _format(path: pathlib.Path) -> str | None:
    name = path.name.lower()
    return next((fmt for suffix, fmt in FORMATS.items() if name.endswith(suffix)), None)


def _read_files(pattern: str, key: str, columns: dict[str, str] | None):
    """Reads `columns` (name -> the config key naming it; None = all) of every file.

    CSV columns are read as text (types are decided over all rows, not the first block).

    Returns:
      (table, rows, csv): the files concatenated in order, the row map, and whether they are CSV.
    """
    import pyarrow as pa

    files = _files(pattern, key)
    csv = _format(files[0]) == "csv"
    tables = []
    for f in files:
        names = _column_names(f, csv)
        missing = [c for c in (columns or {}) if c not in names]
        if missing:
            raise DataError(f"{f}: no column {missing[0]!r} ({columns[missing[0]]}); columns: "
                            f"{', '.join(names)}")
        if columns is None and tables and names != tables[0].column_names:
            raise DataError(f"{f}: columns {', '.join(names)} differ from {files[0]}'s "
                            f"{', '.join(tables[0].column_names)}")
        tables.append(_read_one(f, csv, list(columns) if columns is not None else names))
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{key}={pattern}: column types differ between files: {e}") from None
    starts = np.cumsum([0] + [t.num_rows for t in tables])
    return table, _Rows(tuple(files), starts), csv


def _column_names(path: pathlib.Path, csv: bool) -> list[str]:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        if csv:  # the header only: malformed rows are reported by the full read, with a row
            skip = pcsv.ParseOptions(invalid_row_handler=lambda row: "skip")
            return pcsv.open_csv(path, parse_options=skip).schema.names
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as {'CSV' if csv else 'Parquet'}: {e}") from None


def _read_one(path: pathlib.Path, csv: bool, columns: list[str]):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if not csv:
        try:
            return pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read as Parquet: {e}") from None
    convert = pcsv.ConvertOptions(include_columns=columns, null_values=[""],
                                  column_types={c: pa.string() for c in columns},
                                  strings_can_be_null=True)
    try:
        return pcsv.read_csv(path, convert_options=convert)
    except (pa.ArrowException, OSError):
        pass
    try:  # again on one thread: only then does pyarrow's message carry the row number
        pcsv.read_csv(path, convert_options=convert,
                      read_options=pcsv.ReadOptions(use_threads=False))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as CSV: {e} (rows count the header line)") from None
    raise DataError(f"{path}: cannot read as CSV")


# --------------------------------------------------------------------------- columns


def _plain(col):
    """Dictionary-encoded columns decoded; large strings as strings."""
    import pyarrow as pa

    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if _is_text(col.type):
        col = col.cast(pa.string())
    return col


def _is_text(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _np(col, fill=None) -> np.ndarray:
    """A pyarrow array as numpy; nulls become `fill` (filled only when there are nulls)."""
    if fill is not None and col.null_count:
        col = col.fill_null(fill)
    return col.to_numpy(zero_copy_only=False)


def _valid(col) -> np.ndarray:
    return _np(col.is_valid())


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask)) if mask.any() else 0


def _value(col, i: int) -> str:
    return repr(col[i].as_py())


def _ids(col, rows: _Rows, name: str, key: str, trim: bool) -> tuple[np.ndarray, np.ndarray]:
    """[R] raw ids (int64 when every present id is a canonical int, else str) and [R] present."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = _plain(col)
    t = col.type
    if pa.types.is_integer(t):
        try:
            col = col.cast(pa.int64())
        except pa.ArrowInvalid:
            bad = _first(_np(pc.greater(col, np.iinfo(np.int64).max), False))
            raise DataError(f"{rows.at(bad)}: column {name!r} ({key}): id {_value(col, bad)} "
                            f"does not fit int64") from None
        return _np(col, 0), _valid(col)
    if pa.types.is_floating(t):
        ok = _np(pc.is_finite(col), False)
        x = _np(col, 0)
        frac = ok & (np.floor(np.where(ok, x, 0)) != np.where(ok, x, 0))
        if frac.any():
            bad = _first(frac)
            raise DataError(f"{rows.at(bad)}: column {name!r} ({key}) holds {_value(col, bad)}; "
                            f"float ids must be whole numbers")
        return np.where(ok, x, 0).astype(np.int64), ok
    if not pa.types.is_string(t):
        bad = _first(_valid(col))
        raise DataError(f"{rows.at(bad)}: column {name!r} ({key}) has type {t}; ids must be "
                        f"integers or strings")
    if trim:  # spaces around a CSV field are formatting, not part of the id
        col = pc.utf8_trim_whitespace(col)
    col = pc.if_else(pc.equal(pc.utf8_length(col), 0), None, col)
    ok = _valid(col)
    try:
        ints = col.cast(pa.int64())
        if pc.all(pc.equal(ints.cast(pa.string()), col)).as_py() is not False:  # "007" stays str
            return _np(ints, 0), ok
    except pa.ArrowInvalid:
        pass
    return _np(col, "").astype(str), ok


def _seconds(col, rows: _Rows, name: str) -> tuple[np.ndarray, np.ndarray]:
    """[R] int64 epoch seconds and [R] parsed, from integers, floats, timestamps, dates or text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = _plain(col)
    t = col.type
    if pa.types.is_integer(t):
        col = col.cast(pa.int64())
    elif pa.types.is_floating(t):
        ok = _np(pc.is_finite(col), False)
        x = np.where(ok, _np(col, 0), 0)
        return np.floor(x).astype(np.int64), ok
    elif pa.types.is_timestamp(t):
        ticks = _np(col.cast(pa.int64()), 0)
        return ticks // _UNIT_SECONDS[t.unit], _valid(col)
    elif pa.types.is_date(t):
        col = col.cast(pa.timestamp("s")).cast(pa.int64())
    elif pa.types.is_string(t):
        return _parse_times(pc.utf8_trim_whitespace(col))
    else:
        bad = _first(_valid(col))
        raise DataError(f"{rows.at(bad)}: column {name!r} (data.timestamp_column) has type {t}; "
                        f"expected integer epoch seconds, ISO-8601 text or a timestamp type")
    return _np(col, 0), _valid(col)


def _parse_times(text) -> tuple[np.ndarray, np.ndarray]:
    """Epoch seconds from text: integers, or ISO-8601 dates and times (naive = UTC)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:  # the common case: every value an integer
        ints = text.cast(pa.int64())
        return _np(ints, 0), _valid(ints)
    except pa.ArrowInvalid:
        pass
    seconds = np.zeros(len(text), np.int64)
    ok = np.zeros(len(text), bool)
    whole = pc.replace_substring_regex(text, r"\.\d+", "")  # floor to the second
    real_day = _real_day(text, _np(pc.match_substring_regex(text, r"^\d{4}-\d\d-\d\d"), False))
    for pattern, target in ((_INT, pa.int64()), (_NAIVE, pa.timestamp("s")),
                            (_ZONED, pa.timestamp("s", "UTC"))):
        mask = _np(pc.match_substring_regex(text, pattern), False)
        if target != pa.int64():
            mask &= real_day
        if mask.any():
            seconds[mask] = _np(pc.filter(whole, mask).cast(target).cast(pa.int64()))
            ok |= mask
    return seconds, ok


def _real_day(text, mask: np.ndarray) -> np.ndarray:
    """[R] bool: the YYYY-MM-DD prefix names a day that exists (no 30 February)."""
    import pyarrow.compute as pc

    out = np.zeros(len(mask), bool)
    if not mask.any():
        return out
    dates = pc.filter(text, mask)
    y, m, d = (_np(pc.utf8_slice_codeunits(dates, a, b).cast("int64"))
               for a, b in ((0, 4), (5, 7), (8, 10)))
    leap = (y % 4 == 0) & ((y % 100 != 0) | (y % 400 == 0))
    days = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[m] + (leap & (m == 2))
    out[mask] = d <= days
    return out


def _check_weights(col, rows: _Rows, name: str) -> None:
    """The weight column must be numeric (CSV: every present value parses as a number)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = _plain(col)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return
    if pa.types.is_string(col.type):
        text = pc.utf8_trim_whitespace(col)
        try:
            text.cast(pa.float64())
            return
        except pa.ArrowInvalid:
            number = r"(?i)^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$|^[+-]?(nan|inf|infinity)$"
            bad = _first(_np(pc.invert(pc.match_substring_regex(text, number)), False))
            raise DataError(f"{rows.at(bad)}: column {name!r} (data.weight_column) holds "
                            f"{_value(col, bad)}; weights must be numbers") from None
    bad = _first(_valid(col))
    raise DataError(f"{rows.at(bad)}: column {name!r} (data.weight_column) has type {col.type}; "
                    f"weights must be numbers")


def _drop_bad_rows(table, rows: _Rows, problems: dict[str, np.ndarray], max_fraction: float,
                   name: str) -> np.ndarray:
    """[R] bool rows to keep; reports the others in one line, or refuses too many of them."""
    bad = np.logical_or.reduce(list(problems.values()))
    n, n_bad = len(bad), int(bad.sum())
    if n == 0:
        raise DataError(f"{rows.files[0]}: no events")
    if not n_bad:
        return ~bad
    first = _first(bad)
    column = next(c for c, m in problems.items() if m[first])
    counts = ", ".join(f"{c}: {int(m.sum())}" for c, m in problems.items() if m.any())
    what = (f"{name}: {n_bad} of {n} event rows ({n_bad / n:.2%}) cannot be used (missing id or "
            f"unparsable timestamp; {counts}); first: {rows.at(first)}, column {column!r} = "
            f"{_value(table[column], first)}")
    if n_bad > max_fraction * n:
        raise DataError(f"{what}; more than data.max_bad_fraction={max_fraction}")
    _log.warning("%s; dropped (data.max_bad_fraction=%s)", what, max_fraction)
    return ~bad


def _align(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as str when one is int and the other str (the id rule: 42 and "42" are one id)."""
    if (a.dtype.kind == "U") != (b.dtype.kind == "U"):
        return a.astype(str), b.astype(str)
    return a, b


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
    table, rows, csv = _read_files(pattern, config_key, None)
    if key_column not in table.column_names:
        id_key = config_key.replace("features_path", "column")
        raise DataError(f"{rows.files[0]}: no column {key_column!r} (the id column, {id_key}); "
                        f"columns: {', '.join(table.column_names)}")
    ids, ok = _ids(table[key_column], rows, key_column, config_key, csv)
    if not ok.all():
        raise DataError(f"{rows.at(_first(~ok))}: column {key_column!r} has no id")
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


def _special(col, rows: _Rows, name: str, csv: bool) -> np.ndarray:
    """"title": [N] str (trimmed, missing = ""); "year": [N] int32 (missing = 0)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if name == "title":
        text = pc.utf8_trim_whitespace(_plain(col).cast(pa.string()))
        return _np(text, "").astype(str)
    typed = _typed(col, csv)
    if not (pa.types.is_integer(typed.type) or pa.types.is_floating(typed.type)):
        bad = np.ones(len(col), bool)
        if pa.types.is_string(typed.type):
            bad = pc.invert(pc.match_substring_regex(typed, r"^-?\d+(\.0*)?$"))
            bad = _np(bad, False)
        i = _first(bad & _valid(col))
        raise DataError(f"{rows.at(i)}: column {name!r} holds {_value(col, i)} (type "
                        f"{col.type}); years must be integers")
    y = _np(typed.cast(pa.float64()))
    return np.where(np.isfinite(y), y, 0).astype(np.int32)


def _typed(col, csv: bool):
    """CSV text columns as int64 or float64 when every present value parses; trimmed text else."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = _plain(col)
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
        x = _np(col.cast(pa.float64()))  # missing -> NaN
        ok = np.isfinite(x)
        mean = x[ok].mean() if ok.any() else 0.0
        std = x[ok].std() if ok.any() else 0.0
        z = np.where(ok, (x - mean) / (std if std > 0 else 1.0), 0.0)
        return FeatureColumn(name, "numeric", z.astype(np.float32))
    if pa.types.is_string(t) and not pc.any(pc.match_substring(col, separator)).as_py():
        vocab = np.sort(_np(pc.unique(col).drop_null()).astype(str))
        codes = pc.index_in(col, value_set=pa.array(vocab, pa.string()))
        return FeatureColumn(name, "categorical", (_np(codes, -1) + 1)
                             .astype(np.int32), tuple(vocab.tolist()))
    if pa.types.is_string(t):
        lists = pc.split_pattern(col, separator)
    elif (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_text(t.value_type):
        lists = col
    else:
        return None
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    parts = pc.utf8_trim_whitespace(_plain(pc.list_flatten(lists)))
    parent = _np(pc.list_parent_indices(lists))
    keep = _np(pc.greater(pc.utf8_length(parts), 0), False)
    parts = _np(parts)[keep].astype(str)
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
        year = _np(found.cast(pa.int32()), 0)
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
