"""Tests for the data sources: synthetic, MovieLens files (three layouts), TFDS round trip."""

import dataclasses
import sys

import numpy as np
import pytest

from recsys.config import ConfigError, DataConfig
from recsys.data import movielens, sources, synthetic
from recsys.data.schema import DataError, ItemInfo, RawData

SMALL = DataConfig(num_users=300, num_items=400, num_clusters=8, num_genres=6)


# ------------------------------------------------------------------------------ synthetic


@pytest.fixture(scope="module")
def syn() -> RawData:
    return synthetic.generate(DataConfig(num_users=2000, num_items=1000))


def _arrays(raw: RawData) -> dict[str, np.ndarray]:
    return {"user_ids": raw.user_ids, "item_ids": raw.item_ids, "timestamps": raw.timestamps,
            "genres": raw.items.genres, "year": raw.items.year,
            "features": raw.users.features}


def test_synthetic_is_deterministic():
    a, b = synthetic.generate(SMALL), synthetic.generate(SMALL)
    for name, x in _arrays(a).items():
        np.testing.assert_array_equal(x, _arrays(b)[name], err_msg=name)
    np.testing.assert_array_equal(a.items.titles, b.items.titles)
    c = synthetic.generate(dataclasses.replace(SMALL, seed=1))
    assert not np.array_equal(a.item_ids[:100], c.item_ids[:100])


def test_synthetic_shapes_and_dtypes(syn):
    e = len(syn.user_ids)
    assert syn.name == "synthetic"
    assert syn.item_ids.shape == syn.timestamps.shape == (e,)
    assert syn.user_ids.dtype == syn.item_ids.dtype == syn.timestamps.dtype == np.int64
    np.testing.assert_array_equal(syn.items.ids, np.arange(1, 1001))
    assert syn.items.genres.shape == (1000, 12) and syn.items.genres.dtype == bool
    assert syn.items.genres.any(axis=1).all()
    assert syn.items.year.dtype == np.int32 and syn.items.year.min() > 1900
    assert syn.items.titles[0].startswith("Item 1 (Genre-")
    assert np.isin(syn.item_ids, syn.items.ids).all()
    users = syn.users
    assert users.feature_names == ("region", "age_bucket") and users.cardinalities == (9, 7)
    assert users.features.shape == (2000, 2) and users.features.dtype == np.int32
    assert users.features.min() >= 1 and (users.features < np.array([9, 7])).all()
    assert 25 < e / 2000 < 35


def test_synthetic_users_have_distinct_items_in_time_order(syn):
    key = syn.user_ids * 10_000 + syn.item_ids
    assert len(np.unique(key)) == len(key)
    counts = np.bincount(syn.user_ids)[1:]
    assert counts.min() >= 3 and len(counts) == 2000
    same_user = syn.user_ids[1:] == syn.user_ids[:-1]
    assert (np.diff(syn.timestamps)[same_user] > 0).all()


def test_synthetic_popularity_is_skewed(syn):
    counts = np.sort(np.bincount(syn.item_ids, minlength=1001)[1:])[::-1]
    assert counts[:100].sum() / counts.sum() > 0.3  # top 10% of items (uniform: 0.1)


def test_synthetic_history_predicts_next_item(syn):
    it, genres = syn.item_ids - 1, syn.items.genres
    last = np.flatnonzero(np.r_[syn.user_ids[1:] != syn.user_ids[:-1], True])
    shared = (genres[it[last]] & genres[it[last - 1]]).any(axis=1).mean()
    a, b = np.random.default_rng(0).integers(0, len(it), size=(2, 5000))
    chance = (genres[it[a]] & genres[it[b]]).any(axis=1).mean()
    assert shared > chance + 0.25
    # HR@10 on the last event: popularity vs popular items sharing genres with the previous one.
    train = np.ones(len(it), bool)
    train[last] = False
    pop = np.bincount(it[train], minlength=1000).astype(np.float32)
    score = genres[it[last - 1]].astype(np.float32) @ genres.T.astype(np.float32) * 1e6 + pop
    hr_history = (np.argsort(-score, axis=1)[:, :10] == it[last][:, None]).any(axis=1).mean()
    hr_popular = np.isin(it[last], np.argsort(-pop)[:10]).mean()
    assert hr_history > 2 * hr_popular


def test_synthetic_rejects_bad_config():
    with pytest.raises(DataError, match="num_items"):
        synthetic.generate(DataConfig(num_items=2))


# ---------------------------------------------------------------------------- movielens


def _write(path, text: str, encoding: str = "utf-8"):
    path.write_bytes(text.encode(encoding))


@pytest.fixture
def ml100k(tmp_path):
    _write(tmp_path / "u.data", "1\t10\t5\t881250949\n2\t20\t3\t891717742\n1\t30\t4\t878887116\n")
    flags = ["0|0|1" + "|0" * 16, "0|0|0" + "|0" * 15 + "|1", "1" + "|0" * 18]
    _write(tmp_path / "u.item",
           f"10|Café Society (1995)|01-Jan-1995||http://x|{flags[0]}\n"
           f"20|Amélie (2001)|01-Jan-2001||http://y|{flags[1]}\n"
           f"30|unknown|||http://z|{flags[2]}\n", "latin-1")
    _write(tmp_path / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    return tmp_path


def test_movielens_100k(ml100k):
    raw = movielens.read(ml100k)
    assert raw.name == "ml-100k"
    np.testing.assert_array_equal(raw.user_ids, [1, 2, 1])
    np.testing.assert_array_equal(raw.item_ids, [10, 20, 30])
    np.testing.assert_array_equal(raw.timestamps, [881250949, 891717742, 878887116])
    items = raw.items
    assert items.genre_names == movielens.GENRES_100K
    assert list(items.titles) == ["Café Society (1995)", "Amélie (2001)", "unknown"]
    np.testing.assert_array_equal(items.year, [1995, 2001, 0])
    assert items.genres[0, 2] and items.genres[1, 18] and items.genres[2, 0]
    assert items.genres.sum() == 3
    users = raw.users
    assert users.feature_names == ("age_bucket", "gender", "occupation")
    # 24 -> 18-24 (code 2), 53 -> 50-55 (6); occupations sorted: other=1, technician=2.
    np.testing.assert_array_equal(users.features, [[2, 1, 2], [6, 2, 1]])
    assert users.cardinalities == (8, 3, 3)


def test_movielens_1m(tmp_path):
    _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n"
           "2::1193::4::978298413\n")
    _write(tmp_path / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
           "661::Amélie, or Émile (2001)::Comedy|Romance\n", "latin-1")
    _write(tmp_path / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    raw = movielens.read(tmp_path)
    assert raw.name == "ml-1m"
    np.testing.assert_array_equal(raw.item_ids, [1193, 661, 1193])
    assert raw.items.genre_names == ("Comedy", "Drama", "Romance")
    np.testing.assert_array_equal(raw.items.genres, [[0, 1, 0], [1, 0, 1]])
    assert raw.items.titles[1] == "Amélie, or Émile (2001)"
    np.testing.assert_array_equal(raw.items.year, [1975, 2001])
    np.testing.assert_array_equal(raw.users.features, [[1, 2, 11], [7, 1, 17]])
    assert raw.users.cardinalities == (8, 3, 22)


def _write_latest(root, ratings_header="userId,movieId,rating,timestamp"):
    root.mkdir()
    _write(root / "ratings.csv", f"{ratings_header}\n1,1,4.0,964982703\n1,2,3.5,964981247\n"
           "7,3,0.5,1445714994\n")
    _write(root / "movies.csv", 'movieId,title,genres\n1,Toy Story (1995),Animation|Children\n'
           '2,"Dog, The (Léon) (1999)",Comedy\n3,Cosmos,(no genres listed)\n')
    return root


def test_movielens_latest(tmp_path):
    raw = movielens.read(_write_latest(tmp_path / "ml-latest-tiny"))
    assert raw.name == "ml-latest-tiny" and raw.users is None
    np.testing.assert_array_equal(raw.user_ids, [1, 1, 7])
    np.testing.assert_array_equal(raw.timestamps, [964982703, 964981247, 1445714994])
    assert raw.items.genre_names == ("Animation", "Children", "Comedy")
    np.testing.assert_array_equal(raw.items.genres.sum(axis=1), [2, 1, 0])
    assert list(raw.items.titles) == ["Toy Story (1995)", "Dog, The (Léon) (1999)", "Cosmos"]
    np.testing.assert_array_equal(raw.items.year, [1995, 1999, 0])


def test_movielens_errors_name_the_problem(tmp_path, ml100k):
    with pytest.raises(DataError, match="not found: .*nowhere"):
        movielens.read(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="u.data.*ratings.dat.*ratings.csv"):
        movielens.read(tmp_path / "empty")
    with pytest.raises(DataError, match="header has no 'movieId' column"):
        movielens.read(_write_latest(tmp_path / "bad-header", "userId,itemId,rating,timestamp"))
    _write(ml100k / "u.data", "1\t10\t5\t881250949\n2\t20\t891717742\n")
    with pytest.raises(DataError, match=r"u\.data:2: expected 4 tab-separated"):
        movielens.read(ml100k)
    _write(ml100k / "u.data", "1\t10\t5\t881250949\n")
    (ml100k / "u.item").unlink()
    with pytest.raises(DataError, match="no item file u.item"):
        movielens.read(ml100k)


def test_movielens_real_latest_small(movielens_small):
    raw = movielens.read(movielens_small)
    assert raw.name == "ml-latest-small"
    assert len(raw.user_ids) == 100_836
    assert len(np.unique(raw.user_ids)) == 610
    assert len(raw.items.ids) == 9742
    # 20 genre names in the file; '(no genres listed)' (34 movies) is not a column.
    assert len(raw.items.genre_names) == 19
    assert (~raw.items.genres.any(axis=1)).sum() == 34
    assert np.isin(raw.item_ids, raw.items.ids).all()
    assert raw.items.titles[0] == "Toy Story (1995)" and raw.items.year[0] == 1995


# ---------------------------------------------------------------------------------- tfds


def _string_id_raw() -> RawData:
    items = ItemInfo(ids=np.array(["a", "b"]), genres=np.array([[True], [False]]),
                     genre_names=("g",), year=np.array([1999, 0], np.int32), titles=None)
    return RawData(name="strings", user_ids=np.array(["ü1", "u2", "ü1"]),
                   item_ids=np.array(["a", "b", "b"]),
                   timestamps=np.array([3, 1, 2], np.int64), items=items)


def test_tfds_round_trip_without_tensorflow(tmp_path):
    from recsys.data import tfds_source

    for k, raw in enumerate([synthetic.generate(SMALL), _string_id_raw()]):
        data_dir = tmp_path / f"tfds{k}"
        path = tfds_source.prepare(raw, data_dir)
        assert (path / tfds_source.SIDE_INFO).is_file()
        back = tfds_source.read(data_dir)
        assert back.name == raw.name
        for name in ("user_ids", "item_ids", "timestamps"):
            assert getattr(back, name).dtype.kind == getattr(raw, name).dtype.kind
            np.testing.assert_array_equal(getattr(back, name), getattr(raw, name))
        for name in ("ids", "genres", "year"):
            np.testing.assert_array_equal(getattr(back.items, name), getattr(raw.items, name))
        assert back.items.genre_names == raw.items.genre_names
    assert back.users is None  # the string-id data set has no user features
    assert "tensorflow" not in sys.modules


def test_tfds_errors_and_sources_dispatch(tmp_path, ml100k):
    from recsys.data import tfds_source

    with pytest.raises(DataError, match="not found: .*missing"):
        tfds_source.read(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no prepared TFDS dataset at .*recsys_interactions"):
        tfds_source.read(tmp_path / "empty")
    raw = sources.load_raw(DataConfig(source="movielens", path=str(ml100k)))
    assert raw.name == "ml-100k"
    tfds_source.prepare(raw, tmp_path / "tfds")
    back = sources.load_raw(DataConfig(source="tfds", path=str(tmp_path / "tfds")))
    np.testing.assert_array_equal(back.users.features, raw.users.features)
    assert len(sources.load_raw(SMALL).user_ids) > 0
    with pytest.raises(ConfigError, match="data.source='parquet'"):
        sources.load_raw(DataConfig(source="parquet"))


def test_ratings_of_items_missing_from_the_catalogue_are_counted_and_can_be_refused(
        tmp_path, caplog):
    from recsys.data import dataset
    root = _write_latest(tmp_path / "ml-latest-orphans")
    (root / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(
            f"1,{item},4.0,{964982700 + i}\n" for i, item in enumerate([1, 2, 3, 99, 1, 2])))
    raw = movielens.read(root)
    cfg = DataConfig(source="movielens", path=str(root))
    with caplog.at_level("WARNING"):
        ds = dataset.build(raw, cfg)
    assert ds.unknown_item_events == 1 and len(ds.seq_items) == 5
    assert "1 of 6 events" in caplog.text and "item 99" in caplog.text
    with pytest.raises(DataError, match=r"1 of 6 events .*item 99.*unknown_items=fail"):
        dataset.build(raw, dataclasses.replace(cfg, unknown_items="fail"))
