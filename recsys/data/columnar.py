"""Reads Parquet and CSV files (a file, a directory or a glob) as one pyarrow table and converts
its columns to numpy (ids, epoch seconds, present-value masks), naming the file and row of a bad
value: the ground the events reader and its feature tables stand on."""

from __future__ import annotations

import dataclasses
import glob
import pathlib

import numpy as np

from recsys.data.schema import DataError

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv",
           ".csv.bz2": "csv"}
_INT = r"^-?\d{1,18}$"
_DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
_TIME = r"[T ]([01]\d|2[0-3])(:[0-5]\d(:[0-5]\d(\.\d{1,9})?)?)?"
_NAIVE = f"^{_DATE}({_TIME})?$"  # read as UTC
_ZONED = f"^{_DATE}{_TIME}(Z|[+-]([01]\\d|2[0-3])(:?[0-5]\\d)?)$"
_UNIT_SECONDS = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}


@dataclasses.dataclass(frozen=True)
class Rows:
    """Maps a row of the concatenated table back to its file and 1-based data row."""

    files: tuple[pathlib.Path, ...]
    starts: np.ndarray  # [F + 1] first row of each file in the concatenated table

    def at(self, i: int) -> str:
        f = int(np.searchsorted(self.starts, i, "right")) - 1
        return f"{self.files[f]} row {i - int(self.starts[f]) + 1}"


def require_pyarrow() -> None:
    """Raises DataError with the pip command when pyarrow is missing."""
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.csv
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("data.source=events reads Parquet and CSV with pyarrow, which is not "
                        "installed: pip install 'recsys[events]'") from None


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


def read_files(pattern: str, key: str, columns: dict[str, str] | None):
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
    return table, Rows(tuple(files), starts), csv


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


def plain(col):
    """Dictionary-encoded columns decoded; large strings as strings."""
    import pyarrow as pa

    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if is_text(col.type):
        col = col.cast(pa.string())
    return col


def is_text(t) -> bool:
    """Whether the pyarrow type `t` holds strings (plain, large or view)."""
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def to_numpy(col, fill=None) -> np.ndarray:
    """A pyarrow array as numpy; nulls become `fill` (filled only when there are nulls)."""
    if fill is not None and col.null_count:
        col = col.fill_null(fill)
    return col.to_numpy(zero_copy_only=False)


def valid(col) -> np.ndarray:
    """[R] bool: the value is present (not null)."""
    return to_numpy(col.is_valid())


def first_true(mask: np.ndarray) -> int:
    """The index of the first True in `mask` (0 when none)."""
    return int(np.argmax(mask)) if mask.any() else 0


def value_repr(col, i: int) -> str:
    """Row `i` of `col` as Python shows it, for error messages."""
    return repr(col[i].as_py())


def parse_ids(col, rows: Rows, name: str, key: str, trim: bool) -> tuple[np.ndarray, np.ndarray]:
    """[R] raw ids (int64 when every present id is a canonical int, else str) and [R] present."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = plain(col)
    t = col.type
    if pa.types.is_integer(t):
        try:
            col = col.cast(pa.int64())
        except pa.ArrowInvalid:
            bad = first_true(to_numpy(pc.greater(col, np.iinfo(np.int64).max), False))
            raise DataError(f"{rows.at(bad)}: column {name!r} ({key}): id {value_repr(col, bad)} "
                            f"does not fit int64") from None
        return to_numpy(col, 0), valid(col)
    if pa.types.is_floating(t):
        ok = to_numpy(pc.is_finite(col), False)
        x = to_numpy(col, 0)
        frac = ok & (np.floor(np.where(ok, x, 0)) != np.where(ok, x, 0))
        if frac.any():
            bad = first_true(frac)
            raise DataError(f"{rows.at(bad)}: column {name!r} ({key}) holds "
                            f"{value_repr(col, bad)}; float ids must be whole numbers")
        return np.where(ok, x, 0).astype(np.int64), ok
    if not pa.types.is_string(t):
        bad = first_true(valid(col))
        raise DataError(f"{rows.at(bad)}: column {name!r} ({key}) has type {t}; ids must be "
                        f"integers or strings")
    if trim:  # spaces around a CSV field are formatting, not part of the id
        col = pc.utf8_trim_whitespace(col)
    col = pc.if_else(pc.equal(pc.utf8_length(col), 0), None, col)
    ok = valid(col)
    try:
        ints = col.cast(pa.int64())
        if pc.all(pc.equal(ints.cast(pa.string()), col)).as_py() is not False:  # "007" stays str
            return to_numpy(ints, 0), ok
    except pa.ArrowInvalid:
        pass
    return to_numpy(col, "").astype(str), ok


def align_ids(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as str when one is int and the other str (the id rule: 42 and "42" are one id)."""
    if (a.dtype.kind == "U") != (b.dtype.kind == "U"):
        return a.astype(str), b.astype(str)
    return a, b


def parse_seconds(col, rows: Rows, name: str) -> tuple[np.ndarray, np.ndarray]:
    """[R] int64 epoch seconds and [R] parsed, from integers, floats, timestamps, dates or text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = plain(col)
    t = col.type
    if pa.types.is_integer(t):
        col = col.cast(pa.int64())
    elif pa.types.is_floating(t):
        ok = to_numpy(pc.is_finite(col), False)
        x = np.where(ok, to_numpy(col, 0), 0)
        return np.floor(x).astype(np.int64), ok
    elif pa.types.is_timestamp(t):
        ticks = to_numpy(col.cast(pa.int64()), 0)
        return ticks // _UNIT_SECONDS[t.unit], valid(col)
    elif pa.types.is_date(t):
        col = col.cast(pa.timestamp("s")).cast(pa.int64())
    elif pa.types.is_string(t):
        return _parse_times(pc.utf8_trim_whitespace(col))
    else:
        bad = first_true(valid(col))
        raise DataError(f"{rows.at(bad)}: column {name!r} (data.timestamp_column) has type {t}; "
                        f"expected integer epoch seconds, ISO-8601 text or a timestamp type")
    return to_numpy(col, 0), valid(col)


def _parse_times(text) -> tuple[np.ndarray, np.ndarray]:
    """Epoch seconds from text: integers, or ISO-8601 dates and times (naive = UTC)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:  # the common case: every value an integer
        ints = text.cast(pa.int64())
        return to_numpy(ints, 0), valid(ints)
    except pa.ArrowInvalid:
        pass
    seconds = np.zeros(len(text), np.int64)
    ok = np.zeros(len(text), bool)
    whole = pc.replace_substring_regex(text, r"\.\d+", "")  # floor to the second
    real_day = _real_day(text, to_numpy(pc.match_substring_regex(text, r"^\d{4}-\d\d-\d\d"), False))
    for pattern, target in ((_INT, pa.int64()), (_NAIVE, pa.timestamp("s")),
                            (_ZONED, pa.timestamp("s", "UTC"))):
        mask = to_numpy(pc.match_substring_regex(text, pattern), False)
        if target != pa.int64():
            mask &= real_day
        if mask.any():
            seconds[mask] = to_numpy(pc.filter(whole, mask).cast(target).cast(pa.int64()))
            ok |= mask
    return seconds, ok


def _real_day(text, mask: np.ndarray) -> np.ndarray:
    """[R] bool: the YYYY-MM-DD prefix names a day that exists (no 30 February)."""
    import pyarrow.compute as pc

    out = np.zeros(len(mask), bool)
    if not mask.any():
        return out
    dates = pc.filter(text, mask)
    y, m, d = (to_numpy(pc.utf8_slice_codeunits(dates, a, b).cast("int64"))
               for a, b in ((0, 4), (5, 7), (8, 10)))
    leap = (y % 4 == 0) & ((y % 100 != 0) | (y % 400 == 0))
    days = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[m] + (leap & (m == 2))
    out[mask] = d <= days
    return out

