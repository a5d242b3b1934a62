"""Vocabularies, the leave-last-out split, histories without leakage, batch order."""

import numpy as np
import pytest

from recsys.config import DataConfig
from recsys.data import dataset
from recsys.data.batches import (
    BatchOrder,
    epoch_places,
    event_query_inputs,
    example_indices,
    example_inputs,
    item_inputs,
    shuffled,
    storage_order,
)
from recsys.data.schema import DataError, ItemInfo, RawData
from recsys.data.vocab import Vocab

WINDOW = DataConfig().shuffle_window  # data this small is one window: one shuffle per epoch


def _raw(user_ids, item_ids, times, catalogue=None):
    catalogue = np.array(sorted(set(item_ids)) if catalogue is None else catalogue)
    items = ItemInfo(ids=catalogue, genres=np.zeros((len(catalogue), 2), bool),
                     genre_names=("a", "b"), year=np.zeros(len(catalogue), np.int32))
    return RawData("toy", np.array(user_ids), np.array(item_ids), np.array(times, np.int64), items)


def test_vocab_maps_raw_ids_both_ways_and_unknown_to_zero():
    v = Vocab(np.array([30, 10, 20, 10]))
    assert v.size == 4
    np.testing.assert_array_equal(v.lookup([10, 20, 30, 99]), [1, 2, 3, 0])
    np.testing.assert_array_equal(v.lookup(["20", "x", 1.5]), [2, 0, 0])  # str ids of an int vocab
    np.testing.assert_array_equal(v.raw([3, 1]), [30, 10])
    s = Vocab(np.array(["b", "a"]))
    np.testing.assert_array_equal(s.lookup(["a", "b", "c", 7]), [1, 2, 0, 0])


def test_split_is_leave_last_out_by_time_with_ties_in_file_order():
    # user 7: events at t=5,1,3,3 (the two t=3 events keep file order: item 12 before 13).
    raw = _raw([7, 7, 7, 7, 8, 8, 8], [10, 11, 12, 13, 10, 11, 12], [5, 1, 3, 3, 9, 8, 7])
    ds = dataset.build(raw, DataConfig(history_len=3))
    u7 = ds.users.lookup([7])[0]
    seq7 = ds.items.raw(ds.seq_items[ds.offsets[u7]:ds.offsets[u7 + 1]])
    np.testing.assert_array_equal(seq7, [11, 12, 13, 10])
    test, val = ds.eval_positions("test"), ds.eval_positions("val")
    assert ds.items.raw(ds.seq_items[test]).tolist() == [10, 10]
    assert ds.items.raw(ds.seq_items[val]).tolist() == [13, 11]
    train_only = ds.items.raw(ds.seq_items[ds.train_positions("train")]).tolist()
    assert train_only == [11, 12, 12]
    assert len(ds.train_positions("train+val")) == 5


def test_history_is_strictly_before_the_event_and_left_padded():
    raw = _raw([1] * 5, [10, 11, 12, 13, 14], [1, 2, 3, 4, 5])
    ds = dataset.build(raw, DataConfig(history_len=3))
    test = ds.eval_positions("test")
    hist = ds.history(test)
    np.testing.assert_array_equal(ds.items.raw(hist[0]), [11, 12, 13])
    first = ds.history(np.array([ds.offsets[1]]))
    np.testing.assert_array_equal(first, [[0, 0, 0]])
    second = ds.history(np.array([ds.offsets[1] + 1]))
    assert second[0, :2].tolist() == [0, 0] and ds.items.raw(second[0, 2:]).tolist() == [10]
    offsets, excluded = ds.earlier_items(test)
    assert ds.items.raw(excluded).tolist() == [10, 11, 12, 13]
    assert offsets.tolist() == [0, 4]


def test_no_leakage_on_synthetic_data():
    from recsys.data.synthetic import generate
    ds = dataset.build(generate(DataConfig(num_users=200, num_items=300)), DataConfig(history_len=8))
    positions = ds.train_positions("train+val")
    hist = ds.history(positions)
    # Every history item occurs strictly earlier in the same user's sequence.
    for p, h in zip(positions[:500], hist[:500]):
        start = ds.offsets[ds.seq_users[p]]
        earlier = ds.seq_items[start:p]
        real = h[h > 0]
        np.testing.assert_array_equal(real, earlier[-len(real):] if len(real) else real)
        assert ds.seq_items[p] not in real
    # No test target is a training target.
    test = ds.eval_positions("test")
    assert not np.isin(test, positions).any()


def test_users_with_too_few_events_are_dropped_and_unknown_items_ignored():
    raw = _raw([1, 1, 1, 2, 2], [10, 11, 99, 10, 11], [1, 2, 3, 1, 2], catalogue=[10, 11])
    with pytest.raises(DataError, match="min_user_events"):
        dataset.build(raw, DataConfig(min_user_events=3))
    ds = dataset.build(raw, DataConfig(min_user_events=2))
    assert ds.num_users == 2 and ds.num_items == 2 and len(ds.seq_items) == 4


def test_batch_order_is_seeded_resumable_and_covers_each_epoch():
    positions = np.arange(100, 200)
    a, b = BatchOrder(positions, 32, 3, WINDOW), BatchOrder(positions, 32, 3, WINDOW)
    first = [a.at(s) for s in range(10)]
    np.testing.assert_array_equal(b.at(7), first[7])  # resuming at step 7 sees the same batch
    epoch = np.concatenate(first)[:100]
    assert sorted(epoch.tolist()) == list(range(100, 200))
    assert not np.array_equal(BatchOrder(positions, 32, 4, WINDOW).at(0), first[0])
    halves = np.concatenate([a.at(5, 0, 2), a.at(5, 1, 2)])
    np.testing.assert_array_equal(halves, first[5])
    rows = np.array([31, 0, 7])  # any rows, e.g. sharding.process_rows on a TPU topology
    np.testing.assert_array_equal(a.at(5, rows=rows), first[5][rows])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 255, 1000, 4097])
def test_shuffled_is_a_permutation_per_seed_and_epoch(n):
    perms = {(seed, epoch): shuffled(np.arange(n), n, seed, epoch)
             for seed in (0, 1) for epoch in (0, 1)}
    for p in perms.values():
        assert p.dtype == np.int64 and sorted(p.tolist()) == list(range(n))
    if n >= 255:  # other seeds and epochs give other orders; no index stays near its place
        assert len({p.tobytes() for p in perms.values()}) == 4
        p = perms[(0, 0)]
        assert abs(np.corrcoef(np.arange(n), p)[0, 1]) < 0.1
    # Any subset of indices, in any order, is mapped alone (no state, no n-sized table).
    sub = np.array([n - 1, 0, n // 2])
    np.testing.assert_array_equal(shuffled(sub, n, 1, 1), perms[(1, 1)][sub])


def test_batches_cross_epoch_boundaries_without_repeats_inside_an_epoch():
    n, b = 10, 4  # batch 2 holds the last 2 examples of epoch 0 and the first 2 of epoch 1
    flat = np.concatenate([example_indices(s, np.arange(b), b, n, 3, WINDOW)
                           for s in range(5)])
    assert sorted(flat[:10].tolist()) == list(range(10))
    assert sorted(flat[10:20].tolist()) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:20])
    np.testing.assert_array_equal(flat[10:20], shuffled(np.arange(10), n, 3, 1))


@pytest.mark.parametrize("n,window", [(10, 3), (100, 7), (97, 97), (98, 97), (1000, 100),
                                      (1001, 100), (5, 1)])
def test_windowed_epochs_are_permutations_that_read_a_window_at_a_time(n, window):
    orders = {(seed, epoch): epoch_places(np.arange(n), n, window, seed, epoch)
              for seed in (0, 1) for epoch in (0, 1)}
    count = -(-n // window)
    for order in orders.values():
        assert sorted(order.tolist()) == list(range(n))
        # Each window's examples come as one run of places: the window changes count-1 times.
        assert np.count_nonzero(np.diff(order // window)) == count - 1
    if n <= window:  # one window: exactly the whole-data shuffle
        np.testing.assert_array_equal(orders[(1, 1)], shuffled(np.arange(n), n, 1, 1))
    if n >= 1000:  # seeds and epochs reorder the windows and the examples inside them
        assert len({o.tobytes() for o in orders.values()}) == 4
        assert len({tuple(o[::window] // window) for o in orders.values()}) > 1
    sub = np.array([n - 1, 0, n // 2])  # any places, alone
    np.testing.assert_array_equal(epoch_places(sub, n, window, 1, 1), orders[(1, 1)][sub])


def test_storage_order_spreads_every_window_over_the_whole_data():
    np.testing.assert_array_equal(storage_order(500, 500), np.arange(500))  # one window: as is
    n, window = 20_000, 1000
    stored = storage_order(n, window)
    assert sorted(stored.tolist()) == list(range(n))
    np.testing.assert_array_equal(storage_order(n, window, 1234, 10), stored[1234:1244])
    np.testing.assert_array_equal(storage_order(n, 999)[:5], storage_order(n, 1)[:5])
    for w in range(0, n, window):  # each window: a uniform sample, every tenth of the data
        deciles = np.bincount(stored[w:w + window] * 10 // n, minlength=10)
        assert deciles.min() > 60, deciles


def test_a_windowed_batch_order_covers_each_epoch_from_one_window_at_a_time():
    positions = np.arange(5000, 7000)  # e.g. users' events in time order
    order = BatchOrder(positions, 50, seed=2, window=300)
    epoch = np.concatenate([order.at(s) for s in range(40)])
    assert sorted(epoch.tolist()) == positions.tolist()
    stored_at = {int(p): i for i, p in enumerate(order.positions)}  # position -> example
    for s in range(40):
        windows = {stored_at[int(p)] // 300 for p in order.at(s)}
        assert len(windows) <= 2
    first = order.at(0)
    assert np.ptp(first) > 1000  # a window spreads over the data, not 300 neighbouring events
    np.testing.assert_array_equal(BatchOrder(positions, 50, 2, 300).at(17), order.at(17))


@pytest.mark.parametrize("window", [WINDOW, 300])
def test_large_data_computes_each_batch_as_the_cached_epoch_order_gives_it(window, monkeypatch):
    from recsys.data import batches
    positions = np.arange(3000, 5000)
    cached = [BatchOrder(positions, 64, 5, window).at(s, rows=np.arange(7, 40)) for s in range(70)]
    monkeypatch.setattr(batches, "CACHED_PERMUTATION_MAX", 100)  # as above 16M examples
    order = BatchOrder(positions, 64, 5, window)
    for s in range(70):  # two epochs and a bit
        np.testing.assert_array_equal(order.at(s, rows=np.arange(7, 40)), cached[s])
    assert not order._permutations  # no epoch-sized array was built


def test_example_inputs_shapes():
    from recsys.data.synthetic import generate
    ds = dataset.build(generate(DataConfig(num_users=50, num_items=80)), DataConfig(history_len=6))
    batch = example_inputs(ds, ds.train_positions("train")[:16])
    assert batch["history"].shape == (16, 6) and batch["item"].shape == (16,)
    assert batch["item_genres"].shape[0] == 16 and batch["user_feats"].shape[0] == 16


def test_example_inputs_builds_only_the_named_inputs_and_the_same_values():
    from recsys.data.synthetic import generate
    ds = dataset.build(generate(DataConfig(num_users=50, num_items=80)), DataConfig(history_len=6))
    positions = ds.train_positions("train")[5:21]
    # The query and item inputs as serving and evaluation build them.
    full = {**event_query_inputs(ds, positions), **item_inputs(ds.features, ds.seq_items[positions])}
    assert tuple(example_inputs(ds, positions)) == tuple(full)
    for names in (("history", "item", "user"), tuple(full)):
        some = example_inputs(ds, positions, names)
        assert tuple(some) == names
        for k in names:
            assert some[k].dtype == full[k].dtype
            np.testing.assert_array_equal(some[k], full[k])
    with pytest.raises(KeyError, match="no example input named"):
        example_inputs(ds, positions, ("user", "colour"))
