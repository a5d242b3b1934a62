"""The DCN-v2 ranker, its inputs (time features, history attention) and its training examples."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recsys import sharding
from recsys.config import DataConfig, MeshConfig, RankerConfig
from recsys.data import dataset as dataset_lib
from recsys.data.synthetic import generate
from recsys.models.ranker import CrossLayer, Ranker
from recsys.models.ranker_inputs import (
    DAY,
    WINDOWS_DAYS,
    ItemTimeline,
    RankerTables,
    device_ranker_inputs,
    device_tables,
    input_spec,
    ranker_inputs,
    split_time,
)
from recsys.models.two_tower import Vocabularies
from recsys.serve.requests import MAX_TIME
from recsys.train.ranker_data import Events, holdout_dataset, listwise_rows, retrieved_only

V, U, G, D, L = 50, 20, 4, 8, 6


@pytest.fixture(autouse=True)
def one_device_mesh():
    """Parameters carry logical axes, so building a model needs a mesh and the rules table."""
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        yield


def tables(rng, log_rows=None, log_times=None) -> RankerTables:
    vecs = rng.standard_normal((V, D)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    if log_rows is None:
        log_rows, log_times = rng.integers(1, V, 500), rng.integers(0, 400 * DAY, 500)
    return RankerTables(vecs, (rng.random((V, G)) < 0.3).astype(np.float32),
                        rng.integers(0, 30, V).astype(np.int32),
                        rng.random(V).astype(np.float32), np.zeros((U, 1), np.int32),
                        ItemTimeline.build(log_rows, log_times, V))


def batch(t: RankerTables, rng, b=3, n=5) -> dict:
    hist = rng.integers(0, V, (b, L)).astype(np.int32)
    hist[0, :3] = 0  # left padding
    q = t.item_vectors[rng.integers(1, V, b)]
    return ranker_inputs(t, q, rng.integers(1, U, b), hist, np.full(b, 300 * DAY),
                         np.full(b, 299 * DAY), rng.integers(1, V, (b, n)))


@nnx.jit
def score(m, x):
    return m(x)  # one compiled call instead of op-by-op dispatch


def model(**kw) -> Ranker:
    cfg = RankerConfig(embed_dim=4, hidden_dims=(8,), **kw)
    return Ranker(cfg, Vocabularies(U, V, G, (2,)), L, nnx.Rngs(0), vector_dim=D,
                  temperature=0.05)


def test_timeline_counts_only_events_strictly_before_the_request_in_the_window():
    t = ItemTimeline.build(np.array([3, 3, 3, 4]), np.array([10, 20, 30, 5]) * DAY, 6)
    rows = np.array([[3, 4, 5]])
    np.testing.assert_array_equal(t.counts_before(rows, np.array([30 * DAY]), 0), [[2, 1, 0]])
    np.testing.assert_array_equal(t.counts_before(rows, np.array([30 * DAY]), 15 * DAY), [[1, 0, 0]])
    np.testing.assert_array_equal(t.counts_before(rows, np.array([0]), 0), [[0, 0, 0]])
    assert t.first_time_V[3] == 10 * DAY and t.last_time == 30 * DAY


def test_candidate_features_follow_the_request_time():
    rng = np.random.default_rng(0)
    t = tables(rng, np.array([7, 7]), np.array([100, 200]) * DAY)
    early = ranker_inputs(t, np.zeros((1, D)), [1], np.zeros((1, L)), [150 * DAY], [-1], [[7, 8]])
    late = ranker_inputs(t, np.zeros((1, D)), [1], np.zeros((1, L)), [250 * DAY], [-1], [[7, 8]])
    # Window counts and "known before" grow with time; an item never seen stays at zero.
    assert late["item_stats"][0, 0, 1:].sum() > early["item_stats"][0, 0, 1:].sum()
    assert early["item_stats"][0, 0, -1] == 1 and early["item_stats"][0, 1, -1] == 0
    assert early["context"][0, 2] == 0  # last event time unknown
    spec = input_spec(D, G, 1, L)
    assert set(spec) == set(early)
    for k, (dtype, shape) in spec.items():
        assert early[k].dtype == dtype, k
        assert early[k].ndim == len(shape.split(", ")), k


def host_and_device(t: RankerTables, q, user_B, hist_BxL, time_B, last_B, cand_BxN):
    """The ranker inputs built on the host (training) and inside jit (serving), as numpy."""
    time_B, last_B = np.asarray(time_B, np.int64), np.asarray(last_B, np.int64)
    host = ranker_inputs(t, q, user_B, hist_BxL, time_B, last_B, cand_BxN)
    arrays, layout = device_tables(t)
    run = jax.jit(lambda arrays, *request: device_ranker_inputs(arrays, layout, *request))
    device = run(arrays, np.asarray(q, np.float32), np.asarray(user_B, np.int32),
                 np.asarray(hist_BxL, np.int32), split_time(time_B), split_time(last_B),
                 np.asarray(cand_BxN, np.int32))
    return host, {k: np.asarray(v) for k, v in device.items()}


def assert_same_inputs(host: dict, device: dict) -> None:
    assert set(device) == set(host)
    for k, want in host.items():
        got = device[k]
        assert got.dtype == want.dtype and got.shape == want.shape, (k, got.dtype, want.dtype)
        if np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got, want, err_msg=k)
        else:
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6, err_msg=k)


def test_in_jit_inputs_equal_the_host_ones_at_window_edges_and_extreme_times():
    rng = np.random.default_rng(4)
    # Row 3: 600 events every 2.4 hours, some exactly one window before the request (several
    # search steps); row 9: never seen.
    t0 = 900_000_000
    rows = np.concatenate([np.full(600, 3), rng.integers(1, V, 300)])
    rows[rows == 9] = 8
    times = t0 + np.concatenate([np.arange(600) * (DAY // 10), rng.integers(0, 3000 * DAY, 300)])
    t = tables(rng, rows, times)
    assert device_tables(t)[1].search_steps == 4
    now = t0 + 599 * (DAY // 10)  # events of row 3 lie exactly 0, 1, 7, 30 days before it
    time_B = np.array([now, now + 1, now - 1, t0, 0, MAX_TIME, t0 + 3000 * DAY, now + 365 * DAY])
    b = len(time_B)
    last_B = np.array([now - 5, -1, now, now + 10, -1, now, 0, -1])
    hist = rng.integers(0, V, (b, L)).astype(np.int32)
    hist[1] = 0  # no history at all
    cand = rng.integers(1, V, (b, 12)).astype(np.int32)
    cand[:, :2] = [3, 9]
    host, device = host_and_device(t, t.item_vectors[rng.integers(1, V, b)],
                                   rng.integers(0, U, b), hist, time_B, last_B, cand)
    assert_same_inputs(host, device)
    windows = host["item_stats"][0, 0, 1:1 + len(WINDOWS_DAYS)]
    assert (np.diff(windows) > 0).all(), "row 3's windows should count different events"
    assert host["item_stats"][:, 1, 1:].sum() == 0  # the never-seen row: no counts, no age


def test_in_jit_inputs_equal_the_host_ones_on_the_movielens_event_log(movielens_small):
    """Real shapes: 100k events of 9.7k items over 22 years; serving's 64 x 200 candidates."""
    ratings = np.loadtxt(movielens_small / "ratings.csv", delimiter=",", skiprows=1)
    items, rows = np.unique(ratings[:, 1].astype(np.int64), return_inverse=True)
    times = ratings[:, 3].astype(np.int64)
    v, d, g, b, n = len(items) + 1, 32, 19, 64, 200
    rng = np.random.default_rng(5)
    vecs = rng.standard_normal((v, d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    t = RankerTables(vecs, (rng.random((v, g)) < 0.2).astype(np.float32),
                     rng.integers(0, 32, v).astype(np.int32), rng.random(v).astype(np.float32),
                     np.zeros((611, 0), np.int32), ItemTimeline.build(rows + 1, times, v))
    popular = np.argsort(-np.bincount(rows + 1, minlength=v))[:n // 2]
    cand = np.concatenate([np.tile(popular, (b, 1)), rng.integers(1, v, (b, n - n // 2))], 1)
    when = rng.choice(times, b) + rng.integers(-400, 400, b) * DAY
    hist = rng.integers(0, v, (b, 20)).astype(np.int32)
    host, device = host_and_device(t, vecs[rng.integers(1, v, b)], rng.integers(1, 611, b),
                                   hist, when, when - rng.integers(-DAY, 900 * DAY, b), cand)
    assert_same_inputs(host, device)
    assert (host["item_stats"][..., 1:1 + len(WINDOWS_DAYS)] > 0).any(axis=(0, 1)).all()


@pytest.mark.parametrize("rank", [0, 3])
def test_cross_layer_is_x0_times_affine_of_x_plus_x(rank):
    layer = CrossLayer(6, rank, nnx.Rngs(1))
    x0 = jax.random.normal(jax.random.key(0), (4, 6))
    x = jax.random.normal(jax.random.key(1), (4, 6))
    np.testing.assert_allclose(layer(x0, x), x, atol=1e-6)  # starts as the identity on x
    layer.up.kernel[...] = jax.random.normal(jax.random.key(2), layer.up.kernel[...].shape)
    layer.up.bias[...] = jax.random.normal(jax.random.key(3), layer.up.bias[...].shape)
    if rank:
        w = layer.down.kernel[...] @ layer.up.kernel[...]
        b = layer.down.bias[...] @ layer.up.kernel[...] + layer.up.bias[...]
    else:
        w, b = layer.up.kernel[...], layer.up.bias[...]
    np.testing.assert_allclose(layer(x0, x), x0 * (x @ w + b) + x, rtol=1e-5, atol=1e-5)
    if rank:
        assert layer.down.kernel[...].shape == (6, 3)


@pytest.mark.parametrize("structure, ids", [("stacked", False), ("parallel", True)])
def test_untrained_ranker_keeps_the_retrieval_order_and_scores_every_candidate(structure, ids):
    rng = np.random.default_rng(1)
    t = tables(rng)
    x = batch(t, rng)
    m = model(structure=structure, cross_rank=2, use_ids=ids)
    scores = np.asarray(score(m, x))
    assert scores.shape == (3, 5) and np.isfinite(scores).all()
    dots = np.einsum("bd,bnd->bn", x["q"], x["c"])
    np.testing.assert_array_equal(np.argsort(-scores, 1), np.argsort(-dots, 1))


def test_history_attention_ignores_padding_and_the_correction_learns():
    rng = np.random.default_rng(2)
    t = tables(rng)
    x = batch(t, rng)
    m = model(use_ids=True)
    m.out.kernel[...] = jnp.ones_like(m.out.kernel[...])  # make the correction visible
    base = np.asarray(score(m, x))
    changed = dict(x, h=x["h"].copy())
    changed["h"][0, :3] = 5.0  # padded slots of row 0: must not matter
    np.testing.assert_allclose(np.asarray(score(m, changed))[0], base[0], rtol=1e-5)
    changed["h"][0, -1] = -x["h"][0, -1]  # a real slot: must matter
    assert not np.allclose(np.asarray(score(m, changed))[0], base[0])


def test_holdout_split_hides_the_latest_events_from_the_shadow_dataset():
    cfg = DataConfig(num_users=40, num_items=60, interactions_per_user=12, history_len=5)
    ds = dataset_lib.build(generate(cfg), cfg)
    shadow, train_pos, val_pos = holdout_dataset(ds, 4)
    n = np.diff(ds.offsets)[1:]
    kept = np.diff(shadow.offsets)[1:]
    np.testing.assert_array_equal(kept, n - np.clip(n - 3, 0, 4))
    assert (kept >= 3).all()
    # Validation events are the users' own validation events wherever anything was held out.
    np.testing.assert_array_equal(val_pos, ds.eval_positions("val")[kept < n])
    # The shadow trains on no ranker event: its users' sequences are prefixes ending before.
    local = train_pos - ds.offsets[ds.seq_users[train_pos]]
    assert (local >= kept[ds.seq_users[train_pos] - 1] - 1).all()
    assert not set(train_pos) & set(ds.eval_positions("test")) and not set(train_pos) & set(val_pos)
    u = 1
    np.testing.assert_array_equal(shadow.seq_items[shadow.offsets[u]:shadow.offsets[u + 1]],
                                  ds.seq_items[ds.offsets[u]:ds.offsets[u] + kept[u - 1]])


def test_listwise_rows_put_the_target_first_and_never_repeat_it():
    rng = np.random.default_rng(3)
    cand = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    ev = Events(np.arange(2), np.zeros((2, D)), np.ones(2, int), np.zeros((2, L), int),
                np.zeros(2, int), np.zeros(2, int), np.array([7, 1]), cand)
    full = listwise_rows(ev, 0, 0, rng, 20)
    np.testing.assert_array_equal(full, [[7, 5, 6, 8], [1, 9, 10, 11]])
    sampled = listwise_rows(ev, 6, 2, rng, 20)
    assert sampled.shape == (2, 7) and (sampled[:, 0] == [7, 1]).all()
    assert not (sampled[:, 1:] == sampled[:, :1]).any() and (sampled > 0).all()
    # Only events whose target retrieval returned train the ranker (item 1 was missed).
    kept = retrieved_only(ev)
    assert dataclasses.is_dataclass(kept) and kept.targets.tolist() == [7]


def test_folds_keep_each_user_in_one_fold_and_use_every_fold():
    from recsys.train.ranker import fold_of
    users = np.array([5, 3, 5, 9, 3, 1, 7, 8, 2, 9])
    ev = Events(np.arange(10), np.zeros((10, D)), users, np.zeros((10, L), int), np.zeros(10, int),
                np.zeros(10, int), np.ones(10, int), np.ones((10, 3), int))
    fold = fold_of(ev, 3, seed=0)
    for u in np.unique(users):
        assert len(set(fold[users == u])) == 1
    assert set(fold) == {0, 1, 2}
    np.testing.assert_array_equal(fold, fold_of(ev, 3, seed=0))


@pytest.mark.parametrize("loss", ["softmax", "bce"])
def test_both_losses_prefer_the_true_item_in_column_zero(loss):
    from recsys.train.ranker import ranker_loss
    cfg = RankerConfig(loss=loss)
    right = ranker_loss(lambda b: jnp.array([[3.0, 0.0, -1.0]]), {}, cfg)
    wrong = ranker_loss(lambda b: jnp.array([[-1.0, 0.0, 3.0]]), {}, cfg)
    assert float(right) < float(wrong)


def test_a_ranker_with_no_retrieved_events_to_learn_from_is_one_clear_error():
    from recsys.config import ConfigError
    from recsys.train import ranker as ranker_train
    from recsys.train.ranker_data import Events
    m = 6
    events = Events(positions=np.arange(m), q=np.zeros((m, D), np.float32),
                    users=np.arange(1, m + 1), history=np.zeros((m, L), np.int32),
                    times=np.zeros(m, np.int64), last_times=np.full(m, -1, np.int64),
                    targets=np.full(m, 5), candidates=np.tile(np.arange(1, 5), (m, 1)))
    with pytest.raises(ConfigError, match=r"0 have their target in retrieval's top-4.*ranker.steps=0"):
        ranker_train._cross_validate(RankerConfig(), 0, V, None, None, None, None, events,
                                     ranker_train.fold_of(events, 3, 0), None)
