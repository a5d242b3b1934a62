"""Popularity and EASE baselines on the project's split, against small hand-checked references."""

import numpy as np

from benchmarks import baselines
from recsys.config import DataConfig, EvalConfig
from recsys.data import dataset, synthetic
from recsys.data.schema import ItemInfo, RawData


def _toy(user_ids, item_ids):
    """Events in the given order (time = position), catalogue = items 1..max."""
    n = max(item_ids)
    items = ItemInfo(ids=np.arange(1, n + 1), genres=np.zeros((n, 1), bool), genre_names=("g",),
                     year=np.zeros(n, np.int32))
    raw = RawData("toy", np.array(user_ids), np.array(item_ids),
                  np.arange(len(user_ids), dtype=np.int64), items)
    return dataset.build(raw, DataConfig(history_len=3))


def test_ease_weights_solve_the_zero_diagonal_ridge_regression():
    rng = np.random.default_rng(0)
    x = (rng.random((30, 6)) < 0.4).astype(np.float32)
    lam = 2.0
    b = baselines.ease_weights(x, lam)
    np.testing.assert_array_equal(np.diag(b), 0.0)
    for j in range(6):  # column j: ridge regression of item j on the other items
        others = [i for i in range(6) if i != j]
        xo = x[:, others].astype(np.float64)
        want = np.linalg.solve(xo.T @ xo + lam * np.eye(5), xo.T @ x[:, j])
        np.testing.assert_allclose(b[others, j], want, rtol=1e-4, atol=1e-6)


def test_popularity_ranks_by_fitted_counts_excluding_earlier_items():
    # Per user: train, train, validation, test.
    ds = _toy([1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3], [1, 2, 3, 4, 1, 3, 2, 5, 1, 2, 4, 3])
    cfg = EvalConfig(ks=(1, 2, 3))
    # Validation counts train events only: 1:3, 2:2, 3:1, 4:0, 5:0. Earlier items are excluded.
    # User 1: 3 among {3, 4, 5} -> rank 0. User 2: 2 among {2, 4, 5} -> 0. User 3: 4 among
    # {3, 4, 5} -> 3 scores higher and 5 ties (ties count against): rank 2.
    val = baselines.popularity(ds, "val", cfg)
    np.testing.assert_allclose([val["hr@1"], val["hr@2"], val["hr@3"]], [2 / 3, 2 / 3, 1.0])
    # Test counts train + validation: 1:3, 2:3, 3:2, 4:1, 5:0. User 1: 4 among {4, 5} -> 0.
    # User 2: 5 among {4, 5} -> 1. User 3: 3 among {3, 5} -> 0.
    test = baselines.popularity(ds, "test", cfg)
    np.testing.assert_allclose([test["hr@1"], test["hr@2"]], [2 / 3, 1.0])


def test_ease_uses_the_validation_event_at_test_time():
    # Users 1-3 watch 7 then 8 (8 is their validation event). User 4's validation event is 7,
    # so its test target 8 comes first only if its test-time history includes that event.
    users = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4]
    items = [5, 7, 8, 6, 6, 7, 8, 5, 5, 7, 8, 6, 9, 7, 8]
    ds = _toy(users, items)
    ranks = baselines.ease_ranks(ds, "test", 1.0, EvalConfig(ks=(1,)))
    assert ds.items.raw(ds.seq_items[ds.eval_positions("test")[-1]]) == 8
    assert ranks[-1] == 0


def test_ease_beats_popularity_on_synthetic_tastes():
    cfg = DataConfig(num_users=400, num_items=300, num_clusters=6, num_genres=6, seed=1)
    ds = dataset.build(synthetic.generate(cfg), cfg)
    ev = EvalConfig(ks=(10,))
    lam, grid = baselines.tune_ease(ds, ev, lambdas=(10.0, 100.0))
    assert lam in (10.0, 100.0) and len(grid) == 2
    assert baselines.ease(ds, "test", lam, ev)["hr@10"] > baselines.popularity(ds, "test", ev)["hr@10"]
