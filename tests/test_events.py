"""Tests for data.source=events: Parquet/CSV events, feature tables, schema errors, bad rows."""

import dataclasses
import logging
import pathlib
import sys

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from recsys.config import Config, ConfigError, DataConfig, apply_overrides
from recsys.data import dataset, events, movielens, sources
from recsys.data.schema import DataError, RawData

DATA = pathlib.Path(__file__).resolve().parent / "data"
EXAMPLE = DataConfig(source="events", path=str(DATA / "events.csv"),
                     item_features_path=str(DATA / "items.csv"),
                     user_features_path=str(DATA / "users.csv"))


def _cfg(path, **kw) -> DataConfig:
    return DataConfig(source="events", path=str(path), **kw)


def _csv(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


def _assert_same(a: RawData, b: RawData) -> None:
    for name in ("user_ids", "item_ids", "timestamps"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert getattr(a, name).dtype.kind == getattr(b, name).dtype.kind, name
    for name in ("ids", "genres", "year", "titles"):
        np.testing.assert_array_equal(getattr(a.items, name), getattr(b.items, name), err_msg=name)
    assert a.items.genre_names == b.items.genre_names
    assert (a.users is None) == (b.users is None)
    if a.users is not None:
        np.testing.assert_array_equal(a.users.ids, b.users.ids)
        np.testing.assert_array_equal(a.users.features, b.users.features)
        assert a.users.feature_names == b.users.feature_names
        assert a.users.cardinalities == b.users.cardinalities


# ------------------------------------------------------------------------- the example


def test_example_files_map_onto_the_schema():
    raw = sources.load_raw(EXAMPLE)
    assert raw.name == "events" and len(raw.user_ids) == 81
    assert raw.user_ids.dtype.kind == "U" and raw.item_ids.dtype == np.int64
    assert raw.user_ids[0] == "u10" and raw.item_ids[0] == 104
    # Row 1 is epoch seconds, row 2 ISO-8601 with Z: both parsed, file order kept.
    assert raw.timestamps[0] == 1709407920 and raw.timestamps[1] == 1709412720
    items = raw.items
    np.testing.assert_array_equal(items.ids, np.arange(101, 131))
    assert items.genre_names == ("Action", "Comedy", "Documentary", "Drama", "Romance", "Sci-Fi",
                                 "studio=Harbour", "studio=Kestrel", "studio=Northlight")
    assert items.titles[1] == "Quiet Letters" and items.year[1] == 1991
    np.testing.assert_array_equal(items.genres[1], [0, 1, 0, 1, 0, 0, 1, 0, 0])  # Drama|Comedy
    assert raw.users.feature_names == ("country",) and raw.users.cardinalities == (5,)
    np.testing.assert_array_equal(raw.users.features[:4, 0], [1, 2, 3, 4])  # DE FR JP US


def test_example_builds_a_dataset():
    ds = dataset.build(sources.load_raw(EXAMPLE), EXAMPLE)
    assert ds.num_users == 12 and ds.num_items == 30 and len(ds.seq_items) == 81
    assert ds.features.user_features.shape == (13, 1)
    assert np.all(np.diff(ds.seq_times)[np.diff(ds.seq_users) == 0] >= 0)


def test_unused_columns_are_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="recsys.data.events"):
        events.read(EXAMPLE)
    text = caplog.text
    assert "items.csv: item columns read but not used yet: price (numeric)" in text
    assert "users.csv: user columns read but not used yet: age (numeric), interests (multi)" in text


# --------------------------------------------------------------------- Parquet and CSV


def _to_parquet(src: pathlib.Path, dst: pathlib.Path, **casts) -> pathlib.Path:
    table = pcsv.read_csv(src)
    for name, fn in casts.items():
        table = table.set_column(table.column_names.index(name), name, fn(table[name]))
    pq.write_table(table, dst)
    return dst


def _iso_to_timestamp(col):
    """The example's mixed epoch/ISO text as a Parquet timestamp[ms, UTC] column."""
    text = col.cast(pa.string())
    is_int = pc.match_substring_regex(text, r"^\d+$")
    ints = pc.if_else(is_int, text, None).cast(pa.int64())
    iso = pc.if_else(is_int, None, text).cast(pa.timestamp("s", "UTC")).cast(pa.int64())
    return pc.multiply(pc.coalesce(ints, iso), 1000).cast(pa.timestamp("ms", "UTC"))


def test_parquet_and_csv_give_the_same_raw_data(tmp_path):
    ev = _to_parquet(DATA / "events.csv", tmp_path / "events.parquet",
                     timestamp=_iso_to_timestamp)
    it = _to_parquet(DATA / "items.csv", tmp_path / "items.parquet",
                     genres=lambda c: pc.split_pattern(c, "|"))  # list<string>
    us = _to_parquet(DATA / "users.csv", tmp_path / "users.parquet",
                     country=lambda c: c.dictionary_encode())
    assert pq.read_schema(ev).field("timestamp").type == pa.timestamp("ms", "UTC")
    from_parquet = events.read(_cfg(ev, item_features_path=str(it), user_features_path=str(us)))
    _assert_same(events.read(EXAMPLE), from_parquet)


def test_a_glob_or_directory_of_files_reads_in_name_order(tmp_path):
    table = pcsv.read_csv(DATA / "events.csv",
                          convert_options=pcsv.ConvertOptions(
                              column_types={"timestamp": pa.string()}))
    parts = tmp_path / "parts"
    parts.mkdir()
    for k, start in enumerate(range(0, 81, 30)):
        pq.write_table(table.slice(start, 30), parts / f"part-{k}.parquet")
    (parts / "_SUCCESS").write_text("")
    one = events.read(EXAMPLE)
    for path in (parts / "part-*.parquet", parts):
        raw = events.read(dataclasses.replace(EXAMPLE, path=str(path)))
        _assert_same(one, raw)
    assert events.read(_cfg(parts / "*.parquet")).name == "parts"
    (parts / "part-3.csv").write_text("user_id,item_id,timestamp\n")
    with pytest.raises(DataError, match="mixes Parquet and CSV files"):
        events.read(_cfg(parts / "part-*"))
    with pytest.raises(DataError, match="no Parquet or CSV files found"):
        events.read(_cfg(tmp_path / "nothing-*.csv"))


def test_timestamps_accept_epoch_seconds_and_iso_8601(tmp_path):
    values = ["1700000000", "2023-11-14T22:13:20Z", "2023-11-14 22:13:20", "2023-11-14T22:13:20.9",
              "2023-11-14T23:13:20+01:00", "2023-11-14T20:13:20-0200", "2023-11-14", "2024-02-29",
              "-86400"]
    expected = [1700000000] * 6 + [1699920000, 1709164800, -86400]
    text = "user_id,item_id,timestamp\n" + "".join(f"1,{k},{v}\n" for k, v in enumerate(values))
    raw = events.read(_cfg(_csv(tmp_path / "t.csv", text)))
    np.testing.assert_array_equal(raw.timestamps, expected)
    dates = pa.table({"user_id": [1, 2], "item_id": [1, 2],
                      "timestamp": pa.array([0, 19675], pa.date32())})
    pq.write_table(dates, tmp_path / "d.parquet")
    np.testing.assert_array_equal(events.read(_cfg(tmp_path / "d.parquet")).timestamps,
                                  [0, 19675 * 86400])


def test_column_mapping_and_weights(tmp_path):
    path = _csv(tmp_path / "e.csv", "who,what,when,rating\n7,x1,10,4.5\n8,x2,20,3\n")
    cfg = _cfg(path, user_column="who", item_column="what", timestamp_column="when",
               weight_column="rating")
    raw = events.read(cfg)
    np.testing.assert_array_equal(raw.user_ids, [7, 8])
    np.testing.assert_array_equal(raw.item_ids, ["x1", "x2"])
    np.testing.assert_array_equal(raw.items.ids, ["x1", "x2"])  # catalogue = items seen
    assert raw.items.genres.shape == (2, 0) and raw.items.titles is None
    bad = _csv(tmp_path / "w.csv", "who,what,when,rating\n7,x1,10,4.5\n8,x2,20,lots\n")
    with pytest.raises(DataError, match=r"w\.csv row 2: column 'rating' \(data.weight_column\) "
                                        r"holds 'lots'"):
        events.read(dataclasses.replace(cfg, path=str(bad)))


# ----------------------------------------------------------------------- schema errors


def test_missing_column_names_file_and_config_key(tmp_path):
    path = _csv(tmp_path / "e.csv", "user_id,movie,timestamp\n1,2,3\n")
    with pytest.raises(DataError, match=r"e\.csv: no column 'item_id' \(data.item_column\); "
                                        r"columns: user_id, movie, timestamp"):
        events.read(_cfg(path))


def test_wrong_types_name_file_column_and_row(tmp_path):
    table = pa.table({"user_id": [1, 2, 3], "item_id": [1.0, 2.0, 2.5],
                      "timestamp": [10, 20, 30]})
    pq.write_table(table, tmp_path / "f.parquet")
    with pytest.raises(DataError, match=r"f\.parquet row 3: column 'item_id' \(data.item_column\) "
                                        r"holds 2\.5; float ids must be whole numbers"):
        events.read(_cfg(tmp_path / "f.parquet"))
    table = pa.table({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [None, True]})
    pq.write_table(table, tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet row 2: column 'timestamp' "
                                        r"\(data.timestamp_column\) has type bool"):
        events.read(_cfg(tmp_path / "b.parquet"))
    ok = pa.table({"user_id": [1.0, None], "item_id": [1, 2], "timestamp": [1, 2]})
    pq.write_table(ok, tmp_path / "ok.parquet")  # pandas' int-with-NaN columns are floats
    raw = events.read(_cfg(tmp_path / "ok.parquet", max_bad_fraction=0.5))
    assert raw.user_ids.dtype == np.int64 and raw.user_ids.tolist() == [1]


def test_malformed_csv_line_names_the_row(tmp_path):
    path = _csv(tmp_path / "e.csv", "user_id,item_id,timestamp\n1,2,3\n1,2,3,4\n")
    with pytest.raises(DataError, match=r"e\.csv: .*Row #3: Expected 3 columns, got 4"):
        events.read(_cfg(path))


def test_feature_table_errors_name_file_column_and_row(tmp_path):
    events_csv = _csv(tmp_path / "e.csv", "user_id,item_id,timestamp\n1,2,3\n")
    dup = _csv(tmp_path / "items.csv", "item_id,genres\n1,A\n2,B\n1,C\n")
    with pytest.raises(DataError, match=r"items\.csv row 3: column 'item_id': id 1 appears more"):
        events.read(_cfg(events_csv, item_features_path=str(dup)))
    empty = _csv(tmp_path / "items2.csv", "item_id,genres\n1,A\n,B\n")
    with pytest.raises(DataError, match=r"items2\.csv row 2: column 'item_id' has no id"):
        events.read(_cfg(events_csv, item_features_path=str(empty)))
    nokey = _csv(tmp_path / "items3.csv", "movieId,genres\n1,A\n")
    with pytest.raises(DataError, match=r"items3\.csv: no column 'item_id' \(the id column, "
                                        r"data.item_column\)"):
        events.read(_cfg(events_csv, item_features_path=str(nokey)))
    years = _csv(tmp_path / "items4.csv", "item_id,year\n1,1999\n2,soon\n")
    with pytest.raises(DataError, match=r"items4\.csv row 2: column 'year' holds 'soon'"):
        events.read(_cfg(events_csv, item_features_path=str(years)))


def test_missing_path_and_pyarrow(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data.path is required for data.source=events"):
        events.read(DataConfig(source="events"))
    with pytest.raises(DataError, match="no such file or directory"):
        events.read(_cfg(tmp_path / "absent.parquet"))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    with pytest.raises(DataError, match=r"pip install 'recsys\[events\]'"):
        events.read(EXAMPLE)


def test_config_fields_and_overrides():
    cfg = apply_overrides(Config(), ["data.source=events", "data.path=ev/*.parquet",
                                     "data.user_column=userId", "data.max_bad_fraction=0.05",
                                     "data.multi_value_separator=;"])
    assert (cfg.data.source, cfg.data.user_column, cfg.data.item_column) == (
        "events", "userId", "item_id")
    assert cfg.data.max_bad_fraction == 0.05 and cfg.data.multi_value_separator == ";"
    with pytest.raises(ConfigError, match=r"data.max_bad_fraction=1.5: must be in \[0, 1\]"):
        DataConfig(max_bad_fraction=1.5)


# --------------------------------------------------------------------------- bad rows


BAD = ("user_id,item_id,timestamp\n" + "".join(f"u{k},{k % 5},{1000 + k}\n" for k in range(95))
       + ",1,2000\nu1,,2001\nu2,3,yesterday\nu3,3,2021-02-30\nu4,4,\n")


def test_bad_rows_are_counted_reported_and_dropped(tmp_path, caplog):
    path = _csv(tmp_path / "bad.csv", BAD)
    with caplog.at_level(logging.WARNING, logger="recsys.data.events"):
        raw = events.read(_cfg(path, max_bad_fraction=0.05))
    assert len(raw.user_ids) == 95 and raw.timestamps.max() == 1094
    lines = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("bad: 5 of 100 event rows (5.00%) cannot be used (missing id or "
                               "unparsable timestamp; user_id: 1, item_id: 1, timestamp: 3); "
                               "first: ")
    assert "bad.csv row 96, column 'user_id' = None; dropped (data.max_bad_fraction=0.05)" in lines[0]


def test_too_many_bad_rows_stop_the_run(tmp_path):
    path = _csv(tmp_path / "bad.csv", BAD)
    with pytest.raises(DataError, match=r"5 of 100 event rows .*; more than "
                                        r"data.max_bad_fraction=0.01"):
        events.read(_cfg(path))  # the default, 1%
    only_time = _csv(tmp_path / "t.csv", "user_id,item_id,timestamp\n1,1,5\n1,2,13:00\n")
    with pytest.raises(DataError, match=r"t\.csv row 2, column 'timestamp' = '13:00'"):
        events.read(_cfg(only_time, max_bad_fraction=0.0))


# ----------------------------------------------------------------------- feature tables


def test_feature_columns_by_type(tmp_path):
    path = _csv(tmp_path / "users.csv",
                "user_id,plan,score,tags,active\n"
                "a,pro,1.0,x|y,true\nb,free,3.0,,false\nc,,,y| z ,\nd,pro,5.0,z,true\n")
    ids, _, cols = events.read_feature_table(str(path), "user_id", "data.user_features_path",
                                            "|")
    np.testing.assert_array_equal(ids, ["a", "b", "c", "d"])
    by = {c.name: c for c in cols}
    assert by["plan"].kind == "categorical" and by["plan"].vocabulary == ("free", "pro")
    np.testing.assert_array_equal(by["plan"].values, [2, 1, 0, 2])
    assert by["score"].kind == "numeric"
    np.testing.assert_allclose(by["score"].values, [-1.2247449, 0.0, 0.0, 1.2247449], rtol=1e-6)
    assert by["tags"].kind == "multi" and by["tags"].vocabulary == ("x", "y", "z")
    np.testing.assert_array_equal(by["tags"].values, [[1, 1, 0], [0, 0, 0], [0, 1, 1], [0, 0, 1]])
    assert by["active"].kind == "categorical" and by["active"].vocabulary == ("false", "true")
    raw = events.read(_cfg(_csv(tmp_path / "e.csv", "user_id,item_id,timestamp\na,1,1\n"),
                           user_features_path=str(path)))
    assert raw.users.feature_names == ("plan", "active") and raw.users.cardinalities == (3, 3)


def test_item_table_titles_years_and_id_kinds(tmp_path):
    items = _csv(tmp_path / "items.csv",
                 'item_id,title,genres,kind\nA7,"Heat (1995)",Crime|Drama,film\n'
                 '12,Untitled,,series\n13,"Berlin (2006-2007) ",Drama,series\n')
    ev = _csv(tmp_path / "e.csv", "user_id,item_id,timestamp\n1,12,1\n1,A7,2\n1,99,3\n")
    raw = events.read(_cfg(ev, item_features_path=str(items)))
    np.testing.assert_array_equal(raw.items.ids, ["A7", "12", "13"])
    np.testing.assert_array_equal(raw.item_ids, ["12", "A7", "99"])  # one kind for both
    np.testing.assert_array_equal(raw.items.year, [1995, 0, 2006])
    np.testing.assert_array_equal(raw.items.titles, ["Heat (1995)", "Untitled", "Berlin (2006-2007)"])
    assert raw.items.genre_names == ("Crime", "Drama", "kind=film", "kind=series")
    np.testing.assert_array_equal(raw.items.genres, [[1, 1, 1, 0], [0, 0, 0, 1], [0, 1, 0, 1]])
    ds = dataset.build(raw, dataclasses.replace(_cfg(ev), min_user_events=1))
    assert ds.unknown_item_events == 1 and ds.num_items == 3  # item 99 is not in the catalogue


# ---------------------------------------------------------- equivalence with MovieLens


def test_movielens_as_events_builds_the_same_dataset(movielens_small, tmp_path):
    ratings = pcsv.read_csv(movielens_small / "ratings.csv")
    pq.write_table(ratings.select(["userId", "movieId", "timestamp"]), tmp_path / "ratings.parquet")
    movies = pcsv.read_csv(movielens_small / "movies.csv")
    genres = pc.replace_substring(movies["genres"], movielens.NO_GENRES, "")
    pq.write_table(movies.set_column(2, "genres", genres), tmp_path / "movies.parquet")
    cfg = DataConfig(source="events", path=str(tmp_path / "ratings.parquet"),
                     item_features_path=str(tmp_path / "movies.parquet"), user_column="userId",
                     item_column="movieId", history_len=50)
    a = dataset.build(movielens.read(movielens_small), cfg)
    b = dataset.build(sources.load_raw(cfg), cfg)
    for name in ("offsets", "seq_users", "seq_items", "seq_times", "item_titles"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert getattr(a, name).dtype == getattr(b, name).dtype, name
    for name in ("item_genres", "item_year", "item_release_year", "user_features"):
        np.testing.assert_array_equal(getattr(a.features, name), getattr(b.features, name),
                                      err_msg=name)
    np.testing.assert_array_equal(a.users.ids, b.users.ids)
    np.testing.assert_array_equal(a.items.ids, b.items.ids)
    assert a.genre_names == b.genre_names and len(a.genre_names) == 19
    assert a.unknown_item_events == b.unknown_item_events
