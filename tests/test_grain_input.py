"""The Grain reader yields, step for step, what the in-memory path builds: the same rows of the
same positions with the same feature values, per process, across epochs and after resuming,
with the whole data shuffled at once and in windows (data.shuffle_window)."""

import dataclasses
import json

import numpy as np
import pytest

from recsys import sharding
from recsys.config import DataConfig, MeshConfig
from recsys.data import dataset, prepare
from recsys.data.batches import BatchOrder, example_inputs
from recsys.data.grain_input import PreparedData
from recsys.data.schema import DataError
from recsys.data.sources import load_raw

CFG = DataConfig(num_users=40, num_items=60, interactions_per_user=10, num_clusters=4,
                 num_genres=5, history_len=5)
BATCH, SEED = 64, 7
WINDOW = 48  # the windowed case: ~7 windows of the ~330 examples, one shard each


@pytest.fixture(scope="module", params=["whole", "windowed"])
def cfg(request):
    return CFG if request.param == "whole" else dataclasses.replace(CFG, shuffle_window=WINDOW)


@pytest.fixture(scope="module")
def ds(cfg):
    return dataset.build(load_raw(cfg), cfg)


@pytest.fixture(scope="module")
def data(cfg, tmp_path_factory):
    shards = 2 if cfg.shuffle_window > 1000 else None  # None: a shard per window
    out = prepare.prepare(cfg, tmp_path_factory.mktemp("grain") / "p", num_shards=shards)
    return PreparedData.open(out, expect=cfg)


@pytest.fixture(scope="module")
def order(ds, cfg):
    return BatchOrder(ds.train_positions(cfg.trained_on, cfg.max_examples_per_user), BATCH, SEED,
                      cfg.shuffle_window)


def _steps(data):
    """Steps 0 .. past the second epoch boundary (about 5 batches per epoch here)."""
    return range(2 * data.num_examples // BATCH + 2)


def _assert_is_in_memory_batch(batch, ds, positions):
    np.testing.assert_array_equal(batch.positions, positions)
    want = example_inputs(ds, positions)
    assert list(batch.inputs) == list(want)
    for k, v in want.items():
        assert batch.inputs[k].dtype == v.dtype, k
        np.testing.assert_array_equal(batch.inputs[k], v, err_msg=k)


def test_one_process_reads_the_in_memory_batches_across_epochs(data, ds, order):
    assert data.num_examples % BATCH  # so some batch straddles an epoch boundary
    reader = data.batches(BATCH, SEED, prefetch=2)
    for step in _steps(data):
        batch = next(reader)
        assert batch.step == step
        _assert_is_in_memory_batch(batch, ds, order.at(step))


def test_two_processes_read_their_slices_of_the_same_batches(data, ds, order):
    halves = [data.batches(BATCH, SEED, rows=np.arange(i * BATCH // 2, (i + 1) * BATCH // 2))
              for i in range(2)]
    whole = data.batches(BATCH, SEED, prefetch=0)
    for step in _steps(data):
        parts = [next(r) for r in halves]
        for i, part in enumerate(parts):
            _assert_is_in_memory_batch(part, ds, order.at(step, i, 2))
        joined = next(whole)
        np.testing.assert_array_equal(np.concatenate([p.positions for p in parts]),
                                      joined.positions)
        for k in joined.inputs:
            np.testing.assert_array_equal(np.concatenate([p.inputs[k] for p in parts]),
                                          joined.inputs[k])


def test_rows_of_a_mesh_as_the_loop_asks_for_them(data, ds, order):
    mesh = sharding.make_mesh(MeshConfig(data=4, model=2))
    rows = sharding.process_rows(mesh, BATCH)
    reader = data.batches(BATCH, SEED, rows=rows, start_step=3)
    _assert_is_in_memory_batch(next(reader), ds, order.at(3, rows=rows))


def test_a_resumed_reader_continues_exactly(data):
    first = data.batches(BATCH, SEED)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # as stored in checkpoint metadata
    assert state == {"step": 4, "seed": SEED, "batch_size": BATCH,
                     "num_examples": data.num_examples,
                     "shuffle_window": data.shuffle_window} == first.state_at(4)
    rest = [next(first) for _ in range(6)]
    for resumed in (data.batches(BATCH, SEED, start_step=4), data.batches(BATCH, SEED)):
        resumed.set_state(state)
        for want in rest:
            got = next(resumed)
            assert got.step == want.step
            np.testing.assert_array_equal(got.examples, want.examples)
            np.testing.assert_array_equal(got.inputs["history"], want.inputs["history"])
    with pytest.raises(DataError, match="seed=8, this reader seed=7"):
        data.batches(BATCH, SEED).set_state({**state, "seed": 8})


def test_prefetch_depth_changes_nothing_but_timing(data):
    readers = [data.batches(BATCH, SEED, prefetch=p, num_steps=6) for p in (0, 1, 3)]
    runs = [[b.examples for b in r] for r in readers]
    assert len(runs[0]) == 6
    for run in runs[1:]:
        np.testing.assert_array_equal(np.stack(run), np.stack(runs[0]))


def test_what_training_needs_besides_batches(data, ds, cfg):
    positions = ds.train_positions(cfg.trained_on, cfg.max_examples_per_user)
    assert data.num_examples == len(positions) and data.history_len == cfg.history_len
    assert data.num_items == ds.num_items
    assert data.vocab["item_rows"] == ds.items.size and data.vocab["user_rows"] == ds.users.size
    assert data.vocab["num_genres"] == ds.features.item_genres.shape[1]
    np.testing.assert_array_equal(data.item_counts, ds.item_counts(positions))
    np.testing.assert_array_equal(data.features.item_year, ds.features.item_year)


def test_a_windowed_reader_holds_only_the_shards_of_its_windows(data, cfg):
    if cfg.shuffle_window > 1000:
        pytest.skip("the whole data is one window: every shard serves every batch")
    data = PreparedData.open(data.path)  # its own readers: other tests' may still read ahead
    shards = data._shards
    assert len(shards.files) >= 6  # a shard per window
    batch, most = 16, 0
    with data.batches(batch, SEED, prefetch=0) as reader:  # reads when asked: a known count
        for _ in range(3 * data.num_examples // batch):  # three epochs
            examples = next(reader).examples
            assert len(np.unique(examples // WINDOW)) <= 2  # one window, or the next one too
            most = max(most, len(shards.open_shards))
    # The windows of the last 4 reads: 64 places of the order, at most 3 windows of 48 (4 with
    # the short last one), of the 8.
    assert 2 <= most <= 4 < len(shards.files)
