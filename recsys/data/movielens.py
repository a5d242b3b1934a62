"""Reads the MovieLens 100K, 1M and latest (CSV) directory layouts into RawData."""

from __future__ import annotations

import csv
import io
import pathlib
import re

import numpy as np

from recsys.data.schema import DataError, ItemInfo, RawData, UserInfo

GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western")
NO_GENRES = "(no genres listed)"  # ml-latest's marker for "no genre"; not a genre column
USER_FEATURES = ("age_bucket", "gender", "occupation")
_AGE_STARTS = (1, 18, 25, 35, 45, 50, 56)  # ml-1m age codes; 100K ages are bucketed the same way
_GENDERS = {"M": 1, "F": 2}
_YEAR = re.compile(r"\((\d{4})(?:\s*[-–]\s*\d{0,4})?\)\s*$")
_CHUNK_BYTES = 64 << 20  # ratings parsed per numpy call (bounds temporary memory)
_PAD = b"0" * 18  # lets every field read a full window to its left; 18 digits fit int64
_LAYOUTS = ("ml-100k: u.data + u.item (+ u.user, u.genre); "
            "ml-1m: ratings.dat + movies.dat (+ users.dat); "
            "ml-latest: ratings.csv + movies.csv")


def read(path: str | pathlib.Path) -> RawData:
    """Reads a MovieLens directory, detecting its layout from the files present.

    Every rating is an interaction (implicit feedback); events keep file order.

    Returns:
      RawData named "ml-100k", "ml-1m", or the directory's name for the latest layout, with
      int64 raw user and item ids, genres in file order (100K: `u.genre` or the standard 19;
      1M and latest: sorted names, without "(no genres listed)"), years from the title's
      "(1995)" suffix (0 if absent), and user features age_bucket, gender, occupation
      (100K and 1M only; None when the user file is absent or for latest).

    Raises:
      DataError: naming the missing path, the layouts expected, or the bad file and line.
    """
    root = pathlib.Path(path)
    if not root.exists():
        raise DataError(f"MovieLens path not found: {root}")
    if not root.is_dir():
        raise DataError(f"MovieLens path is not a directory: {root}")
    if (root / "u.data").is_file():
        return _read_100k(root)
    if (root / "ratings.dat").is_file():
        return _read_1m(root)
    if (root / "ratings.csv").is_file():
        return _read_latest(root)
    raise DataError(f"{root}: no MovieLens layout found; expected {_LAYOUTS}")


# ---------------------------------------------------------------------------- layouts


def _read_100k(root: pathlib.Path) -> RawData:
    item_file = _required(root, "u.data", "u.item")
    names = ("user id", "item id", "rating", "timestamp")
    user_ids, item_ids, timestamps = _rating_columns(root / "u.data", b"\t", names, (0, 1, 3))
    genre_file = root / "u.genre"
    genres = _read_genre_names(genre_file) if genre_file.is_file() else GENRES_100K
    items = _read_u_item(item_file, genres)
    user_file = root / "u.user"
    users = _read_u_user(user_file, root / "u.occupation") if user_file.is_file() else None
    return RawData(name="ml-100k", user_ids=user_ids, item_ids=item_ids, timestamps=timestamps,
                   items=items, users=users)


def _read_1m(root: pathlib.Path) -> RawData:
    item_file = _required(root, "ratings.dat", "movies.dat")
    names = ("UserID", "MovieID", "Rating", "Timestamp")
    user_ids, item_ids, timestamps = _rating_columns(root / "ratings.dat", b"::", names,
                                                     (0, 1, 3))
    rows = _split_lines(item_file, "::", ("MovieID", "Title", "Genres"), _decode_latin1)
    items = _items_from_rows(item_file, rows)
    user_file = root / "users.dat"
    users = _read_users_dat(user_file) if user_file.is_file() else None
    return RawData(name="ml-1m", user_ids=user_ids, item_ids=item_ids, timestamps=timestamps,
                   items=items, users=users)


def _read_latest(root: pathlib.Path) -> RawData:
    ratings = root / "ratings.csv"
    item_file = _required(root, "ratings.csv", "movies.csv")
    data = ratings.read_bytes()
    header, _, body = data.partition(b"\n")
    columns = header.decode("utf-8-sig", "replace").strip().split(",")
    wanted = [_column(ratings, columns, name) for name in ("userId", "movieId", "timestamp")]
    user_ids, item_ids, timestamps = _rating_columns(ratings, b",", tuple(columns),
                                                     tuple(wanted), body=body, first_line=2)
    items = _items_from_rows(item_file, _read_movies_csv(item_file))
    return RawData(name=root.resolve().name, user_ids=user_ids, item_ids=item_ids,
                   timestamps=timestamps, items=items)


def _required(root: pathlib.Path, ratings: str, name: str) -> pathlib.Path:
    path = root / name
    if not path.is_file():
        raise DataError(f"{root}: found {ratings} but no item file {name}; the ratings cannot "
                        f"be used without it")
    return path


def _column(path: pathlib.Path, columns: list[str], name: str) -> int:
    if name not in columns:
        raise DataError(f"{path}: header has no {name!r} column (found: {','.join(columns)})")
    return columns.index(name)


# ------------------------------------------------------------------------ ratings tables


def _rating_columns(path: pathlib.Path, sep: bytes, names: tuple[str, ...],
                    wanted: tuple[int, ...], *, body: bytes | None = None,
                    first_line: int = 1) -> list[np.ndarray]:
    """Parses the `wanted` columns (plain non-negative integers) of a ratings file.

    Rows are parsed in ~64 MiB chunks; a malformed row raises DataError naming the file,
    the line number and the fields expected. Columns not wanted (the rating) are skipped.

    Returns:
      One [R] int64 array per wanted column.
    """
    data = path.read_bytes() if body is None else body
    if b"\r" in data:
        data = data.replace(b"\r", b"")
    data = data.rstrip(b"\n")
    parts, start, lines_before = [], 0, 0
    while start < len(data):
        end = data.find(b"\n", start + _CHUNK_BYTES)
        end = len(data) if end < 0 else end
        chunk = data[start:end]
        table = _int_columns(chunk, sep, len(names), wanted)
        if table is None:
            _raise_bad_line(chunk, sep, path, names, wanted, first_line + lines_before)
        parts.append(table)
        lines_before += len(table)
        start = end + 1
    if not parts:
        raise DataError(f"{path}: no ratings")
    return [np.ascontiguousarray(c) for c in np.concatenate(parts).T]


def _int_columns(chunk: bytes, sep: bytes, ncols: int,
                 wanted: tuple[int, ...]) -> np.ndarray | None:
    """[lines, W] int64 of the wanted columns, or None if any line is malformed.

    Works on the raw bytes (about 3x faster than numpy's text parsers): every byte below
    '-' (0x2D) must be a separator or a newline, and wanted fields must be 1..18 digits.
    """
    if len(sep) > 1:  # '::' -> NUL; a stray NUL or ':' then fails the checks below
        chunk = chunk.replace(sep, b"\0")
        sep = b"\0"
    lines = chunk.count(b"\n") + 1
    b = np.frombuffer(_PAD + chunk + b"\n", np.uint8)
    ends = np.flatnonzero(b < 0x2D)
    if len(ends) != ncols * lines:
        return None
    ends = ends.reshape(lines, ncols)
    if not ((b[ends[:, :-1]] == sep[0]).all() and (b[ends[:, -1]] == 10).all()):
        return None
    line_start = np.concatenate([[len(_PAD)], ends[:-1, -1] + 1])
    out = np.empty((lines, len(wanted)), np.int64)
    for j, col in enumerate(wanted):
        end = ends[:, col]
        length = end - (ends[:, col - 1] + 1 if col else line_start)
        width = int(length.max())
        if length.min() < 1 or width > len(_PAD):
            return None
        # [lines, width] bytes ending at each field; bytes left of the field are masked off.
        digits = np.lib.stride_tricks.sliding_window_view(b, width)[end - width] - np.uint8(48)
        inside = np.arange(width) >= (width - length)[:, None]
        if ((digits > 9) & inside).any():
            return None
        digits *= inside
        value = np.zeros(lines, np.int64)
        for k in range(width):
            value = value * 10 + digits[:, k]
        out[:, j] = value
    return out


def _raise_bad_line(chunk: bytes, sep: bytes, path: pathlib.Path, names: tuple[str, ...],
                    wanted: tuple[int, ...], first_line: int) -> None:
    text_sep = sep.decode()
    shown = {"\t": "tab", ",": "comma", "::": "'::'"}[text_sep]
    for k, line in enumerate(chunk.decode("latin-1").split("\n")):
        fields = line.split(text_sep)
        blank = any(ch < "-" for ch in line.replace(text_sep, ""))  # spaces, quotes, signs
        digits = len(fields) == len(names) and all(
            fields[c].isascii() and fields[c].isdigit() for c in wanted)
        if not digits or blank:
            raise DataError(f"{path}:{first_line + k}: expected {len(names)} {shown}-separated "
                            f"fields ({', '.join(names)}) with integer "
                            f"{', '.join(names[c] for c in wanted)} and no blanks or quotes, "
                            f"got {line[:80]!r}")
    raise DataError(f"{path}: could not parse lines {first_line}.. as ratings")


# -------------------------------------------------------------------------- item files


def _decode_latin1(path: pathlib.Path) -> str:
    return path.read_bytes().decode("latin-1")


def _decode_text(path: pathlib.Path) -> str:
    """UTF-8 (ml-latest), falling back to latin-1 for older exports."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _split_lines(path: pathlib.Path, sep: str, names: tuple[str, ...],
                 decode) -> list[list[str]]:
    """Non-empty lines split on `sep`, each with exactly len(names) fields."""
    rows = []
    for k, line in enumerate(decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(sep)
        if len(fields) != len(names):
            raise DataError(f"{path}:{k}: expected {len(names)} {sep!r}-separated fields "
                            f"({', '.join(names)}), got {len(fields)}: {line[:80]!r}")
        rows.append(fields)
    return rows


def _read_movies_csv(path: pathlib.Path) -> list[list[str]]:
    reader = csv.reader(io.StringIO(_decode_text(path)))
    header = [h.strip() for h in next(reader, [])]
    wanted = [_column(path, header, name) for name in ("movieId", "title", "genres")]
    rows = []
    for k, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{k}: expected {len(header)} comma-separated fields "
                            f"({','.join(header)}), got {len(row)}: {','.join(row)[:80]!r}")
        rows.append([row[j] for j in wanted])
    return rows


def _items_from_rows(path: pathlib.Path, rows: list[list[str]]) -> ItemInfo:
    """Rows of [id, title, 'A|B' genres] -> ItemInfo with sorted genre columns."""
    lists = [[g for g in genres.strip().split("|") if g and g != NO_GENRES]
             for _, _, genres in rows]
    names = tuple(sorted({g for gs in lists for g in gs}))
    col = {g: j for j, g in enumerate(names)}
    genres = np.zeros((len(rows), len(names)), bool)
    for i, gs in enumerate(lists):
        genres[i, [col[g] for g in gs]] = True
    return _item_info(path, [r[0] for r in rows], [r[1].strip() for r in rows], genres, names)


def _read_genre_names(path: pathlib.Path) -> tuple[str, ...]:
    rows = _split_lines(path, "|", ("name", "index"), _decode_latin1)
    return tuple(name for name, _ in sorted(rows, key=lambda r: int(r[1])))


def _read_u_item(path: pathlib.Path, names: tuple[str, ...]) -> ItemInfo:
    fields = ("movie id", "title", "release date", "video release date", "IMDb URL")
    fields += tuple(f"{g} flag" for g in names)
    rows = _split_lines(path, "|", fields, _decode_latin1)
    flags = np.array([r[5:] for r in rows], dtype="U1").reshape(len(rows), len(names))
    return _item_info(path, [r[0] for r in rows], [r[1].strip() for r in rows], flags == "1",
                      names)


def _item_info(path: pathlib.Path, ids: list[str], titles: list[str], genres: np.ndarray,
               names: tuple[str, ...]) -> ItemInfo:
    try:
        item_ids = np.array(ids, dtype=np.int64)
    except ValueError:
        raise DataError(f"{path}: item ids must be integers (first column)") from None
    unique, counts = np.unique(item_ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{path}: item id {unique[counts > 1][0]} appears more than once")
    years = [int(m.group(1)) if (m := _YEAR.search(t)) else 0 for t in titles]
    return ItemInfo(ids=item_ids, genres=genres, genre_names=names,
                    year=np.array(years, dtype=np.int32), titles=np.array(titles, dtype=str))


# -------------------------------------------------------------------------- user files


def _read_u_user(path: pathlib.Path, occupation_file: pathlib.Path) -> UserInfo:
    rows = _split_lines(path, "|", ("user id", "age", "gender", "occupation", "zip code"),
                        _decode_latin1)
    if occupation_file.is_file():
        vocab = [line.strip() for line in _decode_latin1(occupation_file).splitlines()
                 if line.strip()]
    else:
        vocab = sorted({r[3] for r in rows})
    ages = _ints(path, [r[1] for r in rows], "age")
    age_code = np.searchsorted(np.array(_AGE_STARTS[1:]), ages, side="right") + 1
    occupation = {name: k + 1 for k, name in enumerate(vocab)}
    return _user_info(path, [r[0] for r in rows], age_code, [r[2] for r in rows],
                      np.array([occupation.get(r[3], 0) for r in rows]), len(vocab) + 1)


def _read_users_dat(path: pathlib.Path) -> UserInfo:
    rows = _split_lines(path, "::", ("UserID", "Gender", "Age", "Occupation", "Zip-code"),
                        _decode_latin1)
    age_index = {start: k + 1 for k, start in enumerate(_AGE_STARTS)}
    ages = _ints(path, [r[2] for r in rows], "Age")
    occupation = _ints(path, [r[3] for r in rows], "Occupation")
    occupation_code = np.where((occupation >= 0) & (occupation <= 20), occupation + 1, 0)
    return _user_info(path, [r[0] for r in rows], np.array([age_index.get(a, 0) for a in ages]),
                      [r[1] for r in rows], occupation_code, 22)


def _user_info(path: pathlib.Path, ids: list[str], age_code: np.ndarray, genders: list[str],
               occupation_code: np.ndarray, num_occupations: int) -> UserInfo:
    gender_code = np.array([_GENDERS.get(g.strip().upper(), 0) for g in genders])
    features = np.stack([age_code, gender_code, occupation_code], axis=1).astype(np.int32)
    return UserInfo(ids=_ints(path, ids, "user id"), features=features,
                    feature_names=USER_FEATURES,
                    cardinalities=(len(_AGE_STARTS) + 1, len(_GENDERS) + 1, num_occupations))


def _ints(path: pathlib.Path, values: list[str], column: str) -> np.ndarray:
    try:
        return np.array(values, dtype=np.int64)
    except ValueError:
        bad = next(v for v in values if not v.strip().lstrip("-").isdigit())
        raise DataError(f"{path}: column {column!r} must hold integers, got {bad!r}") from None
