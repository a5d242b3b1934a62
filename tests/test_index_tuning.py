"""The index tuned to a recall target on held-out queries, with exact search as the fallback."""

import numpy as np
import pytest

from recsys import index as index_lib
from recsys.config import IndexConfig
from recsys.index import tuning


@pytest.fixture(scope="module")
def catalogue():
    items, queries = index_lib.clustered_vectors(30_000, 1200, 16, num_clusters=300, seed=1)
    valid = np.ones(len(items), bool)
    valid[0] = False
    return items, valid, queries, index_lib.build(items, IndexConfig(), valid)


def test_a_met_target_is_the_fastest_setting_that_meets_it_on_held_out_queries(catalogue):
    items, valid, queries, searcher = catalogue
    assert searcher.params.mode == "tree_ah"
    tuned, info = tuning.tune(searcher, items, valid, queries, target=0.9, k=10)
    assert not info.fallback and info.queries == 600
    chosen = [t for t in info.tried if t.get("qps_per_cpu_s") == info.qps_per_cpu_s]
    assert chosen[0]["lower_bound"] >= 0.9 and info.tuning_recall == chosen[0]["recall"]
    assert info.recall >= 0.9 - 0.01  # the held-out half, within sampling noise
    assert info.qps_per_cpu_s > 3 * info.exact_qps_per_cpu_s
    assert tuned.params.leaves_to_search < searcher.params.num_leaves
    assert info.params == tuned.params.to_dict()
    # Every setting tried with fewer leaves at the chosen reorder fell short of the target.
    same_reorder = [t for t in info.tried if t["reorder"] == tuned.params.reorder]
    assert all(t["lower_bound"] < 0.9 for t in same_reorder
               if t["leaves_to_search"] < tuned.params.leaves_to_search)
    # A higher target needs a slower setting.
    _, strict = tuning.tune(searcher, items, valid, queries, target=0.99, k=10)
    assert strict.recall > info.recall and strict.qps_per_cpu_s < info.qps_per_cpu_s


def test_an_unreachable_target_falls_back_to_exact_search(catalogue):
    items, valid, queries, searcher = catalogue
    exact, info = tuning.tune(searcher, items, valid, queries, target=1.0, k=10)
    assert info.fallback and exact.params.mode == "brute_force" and info.recall == 1.0
    np.testing.assert_array_equal(exact.search(queries[:50], 10)[1],
                                  index_lib.ExactSearcher(items, valid).search(queries[:50], 10)[1])


def test_small_catalogues_are_exact_already_and_bad_targets_are_refused(catalogue):
    items, valid, queries, _ = catalogue
    small = index_lib.build(items[:1000], IndexConfig(), valid[:1000])
    same, info = tuning.tune(small, items[:1000], valid[:1000], queries[:100], target=0.95)
    assert same is small and info.recall == 1.0 and not info.fallback
    with pytest.raises(ValueError, match="target_recall"):
        tuning.tune(small, items[:1000], valid[:1000], queries[:100], target=1.5)


def test_a_sharded_index_agrees_with_one_searcher_and_reloads(catalogue, tmp_path):
    items, valid, queries, one = catalogue
    exact = index_lib.ExactSearcher(items, valid)
    single = index_lib.measure(one, exact, queries, 10)
    for shards in (2, 4):
        sharded = index_lib.build(items, IndexConfig(num_shards=shards), valid)
        assert isinstance(sharded, index_lib.ShardedSearcher) and len(sharded.shards) == shards
        assert sorted(sharded.rows_M) == sorted(one.rows_M)  # every valid row, once
        assert index_lib.measure(sharded, exact, queries, 10) >= single - 0.01
        sharded.save(tmp_path / f"s{shards}")
        back = index_lib.load(tmp_path / f"s{shards}")
        np.testing.assert_array_equal(back.search(queries[:64], 10)[1],
                                      sharded.search(queries[:64], 10)[1])
    # A single query, and k above what one shard holds, keep one searcher's shapes.
    scores, rows = sharded.search(queries[0], 10)
    assert scores.shape == rows.shape == (10,) and np.all(np.diff(scores) <= 0)
    (tmp_path / "s4" / "extra.pkl").write_bytes(b"x")
    with pytest.raises(index_lib.IndexLoadError, match="extra.pkl"):
        index_lib.load(tmp_path / "s4")
    # Tuning applies one setting to every shard.
    tuned, info = tuning.tune(index_lib.build(items, IndexConfig(num_shards=2), valid), items,
                              valid, queries, target=0.9)
    assert not info.fallback and info.recall >= 0.89
    assert {s.params.leaves_to_search for s in tuned.shards} == {info.params["leaves_to_search"]}


def test_export_tunes_the_index_on_the_queries_it_is_given_and_records_how(catalogue):
    import dataclasses

    from recsys.config import Config
    from recsys.export import _build_index
    items, _, queries, _ = catalogue
    cfg = dataclasses.replace(Config(), index=IndexConfig(target_recall=0.9))
    searcher, info = _build_index(items, cfg, queries)
    assert info["tuning"]["recall"] >= 0.89 and not info["tuning"]["fallback"]
    assert info["leaves_to_search"] == searcher.params.leaves_to_search
    strict = dataclasses.replace(cfg, index=IndexConfig(target_recall=1.0))
    exact, info = _build_index(items, strict, queries)
    assert info["tuning"]["fallback"] and info["mode"] == exact.params.mode == "brute_force"
    untuned = dataclasses.replace(cfg, index=IndexConfig(target_recall=0.0))
    assert "tuning" not in _build_index(items, untuned, queries)[1]
