"""The towers: order-aware history pooling, time features, per-row items, the per-user example cap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recsys import sharding
from recsys.config import ConfigError, DataConfig, MeshConfig, ModelConfig
from recsys.data import dataset
from recsys.data.batches import example_inputs, item_inputs
from recsys.data.schema import ItemInfo, RawData
from recsys.models import layers
from recsys.models.history import AttentionPooling
from recsys.models.two_tower import TwoTower, Vocabularies, input_names, time_features

L, E = 6, 8


def _mesh():
    return sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])


def _attention(dropout=0.0):
    with jax.set_mesh(_mesh()), nnx.logical_axis_rules(sharding.RULES):
        return AttentionPooling(L, E, dropout, nnx.Rngs(0))


def _history():
    emb = np.random.default_rng(0).standard_normal((2, L, E)).astype(np.float32)
    hist = np.array([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]], np.int32)
    return emb, hist


def test_attention_pooling_is_order_aware_and_ignores_padding():
    pool = _attention()
    # Position embeddings start near zero: make them matter so order must change the output.
    pool.positions[...] = jnp.asarray(np.random.default_rng(1).standard_normal((L, E)), jnp.float32)
    emb, hist = _history()
    out = np.asarray(pool(emb, hist))
    assert out.shape == (2, E) and np.isfinite(out).all()
    # Swapping two real items changes the result (mean pooling would not notice).
    swapped = emb.copy()
    swapped[:, [2, 4]] = swapped[:, [4, 2]]
    assert not np.allclose(np.asarray(pool(swapped, hist)), out, atol=1e-4)
    mean = np.asarray(layers.pool_history(emb, hist, "mean", 0.0))
    np.testing.assert_allclose(np.asarray(layers.pool_history(swapped, hist, "mean", 0.0)), mean,
                               rtol=1e-5)
    # Whatever sits in padding slots gets no weight.
    noisy = emb.copy()
    noisy[0, :2] = 100.0
    np.testing.assert_allclose(np.asarray(pool(noisy, hist)), out, rtol=1e-5, atol=1e-6)
    # An empty history pools to zeros.
    empty = np.asarray(pool(emb, np.zeros_like(hist)))
    np.testing.assert_array_equal(empty, np.zeros_like(empty))


def test_recency_pooling_weights_recent_items_more():
    emb = np.zeros((1, 3, 1), np.float32)
    emb[0, :, 0] = [1.0, 0.0, 0.0]
    hist = np.array([[1, 2, 3]])
    old_first = float(layers.pool_history(emb, hist, "recency", 0.5)[0, 0])
    emb[0, :, 0] = [0.0, 0.0, 1.0]
    new_first = float(layers.pool_history(emb, hist, "recency", 0.5)[0, 0])
    np.testing.assert_allclose([old_first, new_first], [0.25 / 1.75, 1.0 / 1.75], rtol=1e-6)


def _model(pooling="attention", history_len=L):
    cfg = ModelConfig(embed_dim=E, hidden_dims=(16,), out_dim=8, history_pooling=pooling)
    vocab = Vocabularies(num_users=5, num_items=20, num_genres=3, user_cardinalities=(4,),
                         history_len=history_len)
    with jax.set_mesh(_mesh()), nnx.logical_axis_rules(sharding.RULES):
        return TwoTower(cfg, vocab, nnx.Rngs(0))


def test_two_tower_with_attention_history_and_per_row_items():
    model = _model()
    model.eval()
    batch = {"user": np.array([1, 2]), "history": _history()[1],
             "user_feats": np.array([[1], [3]], np.int32)}
    q = np.asarray(model.embed_query(batch))
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
    # Items of shape [B, H] (per-row negatives) embed like the same items one by one.
    genres = np.random.default_rng(0).random((20, 3)).astype(np.float32)
    rows = np.array([[1, 2, 3], [4, 5, 6]])
    per_row = np.asarray(model.embed_items({"item": rows, "item_genres": genres[rows],
                                            "item_year": rows % 4}))
    flat = np.asarray(model.embed_items({"item": rows.ravel(), "item_genres": genres[rows.ravel()],
                                         "item_year": rows.ravel() % 4}))
    assert per_row.shape == (2, 3, 8)
    np.testing.assert_allclose(per_row.reshape(6, 8), flat, rtol=1e-5, atol=1e-6)


def test_attention_model_refuses_a_history_of_another_length():
    model = _model(history_len=L)
    batch = {"user": np.array([1]), "history": np.ones((1, L + 2), np.int32),
             "user_feats": np.array([[1]], np.int32)}
    with pytest.raises(ValueError, match="history_len"):
        model.embed_query(batch)


def test_example_cap_keeps_each_users_latest_training_events():
    users = [1] * 8 + [2] * 4
    raw = RawData("toy", np.array(users), np.arange(12) + 100, np.arange(12, dtype=np.int64),
                  ItemInfo(ids=np.arange(12) + 100, genres=np.zeros((12, 1), bool),
                           genre_names=("g",), year=np.zeros(12, np.int32)))
    ds = dataset.build(raw, DataConfig(history_len=3))
    capped = ds.train_positions("train", max_per_user=3)
    # User 1: train events are its first 6 (val and test held out): the cap keeps events 4-6.
    # User 2: 2 train events, under the cap.
    np.testing.assert_array_equal(ds.items.raw(ds.seq_items[capped]), [103, 104, 105, 108, 109])
    # Each kept target still sees its full history, including events dropped as targets.
    hist = example_inputs(ds, capped[:1])["history"]
    np.testing.assert_array_equal(ds.items.raw(hist[0]), [100, 101, 102])
    assert len(ds.train_positions("train")) == 8
    assert item_inputs(ds.features, np.array([[1, 2]]))["item_genres"].shape == (1, 2, 1)


def test_time_context_and_features_from_the_event_and_the_previous_one():
    users = [1, 1, 1, 1]
    times = np.array([0, 3600 * 5, 3600 * 5 + 60, 946684800 + 86400 * 365], np.int64)
    raw = RawData("toy", np.array(users), np.array([10, 11, 12, 13]), times,
                  ItemInfo(ids=np.array([10, 11, 12, 13]), genres=np.zeros((4, 1), bool),
                           genre_names=("g",), year=np.zeros(4, np.int32)))
    ds = dataset.build(raw, DataConfig(history_len=2))
    ctx = example_inputs(ds, np.arange(4))["time_context"]
    np.testing.assert_array_equal(ctx[:, 1], [-1, 0, 300, 301])  # minutes; -1: first event
    feats = np.asarray(time_features(jnp.asarray(ctx)))
    np.testing.assert_allclose(feats[:, 0], [0.0, np.log1p(5.0), np.log1p(1 / 60), feats[3, 0]],
                               rtol=1e-5)
    assert feats[3, 0] > 10  # decades apart
    np.testing.assert_allclose(feats[3, 1], 0.1, atol=0.002)  # the year 2001: era (2001-2000)/10


def test_time_features_enter_the_query_tower_only_when_enabled():
    cfg = ModelConfig(embed_dim=E, hidden_dims=(16,), out_dim=8, time_features=True)
    vocab = Vocabularies(num_users=5, num_items=20, num_genres=3, history_len=L)
    with jax.set_mesh(_mesh()), nnx.logical_axis_rules(sharding.RULES):
        model = TwoTower(cfg, vocab, nnx.Rngs(0))
    model.eval()
    batch = {"user": np.array([1, 1]), "history": np.repeat(_history()[1][:1], 2, axis=0),
             "user_feats": np.zeros((2, 0), np.int32),
             "time_context": np.array([[500000, 499990], [500000, -1]], np.int32)}
    q = np.asarray(model.embed_query(batch))
    assert not np.allclose(q[0], q[1])  # same user and history, different time


def test_two_tower_inputs_that_do_not_fit_name_both_shapes():
    model = _model(pooling="mean")
    genres = np.zeros((2, 3), np.float32)
    batch = {"user": np.array([1, 2]), "history": _history()[1],
             "user_feats": np.array([[1], [3]], np.int32),
             "item": np.array([1, 2]), "item_genres": genres, "item_year": np.array([0, 1])}
    model(batch)  # fits
    cases = [
        ({"item": np.array([1, 2, 3])}, r"item \(3,\) must be \[B\].*history \(2, 6\)"),
        ({"user": np.array([1, 2, 3])}, r"user \(3,\) does not fit history \(2, 6\)"),
        ({"user_feats": np.array([[1, 2], [3, 1]], np.int32)},
         r"user_feats \(2, 2\) does not fit history \(2, 6\): expected \[B, 1\]"),
        ({"history": np.ones(6, np.int32)}, r"history \(6,\) must be \[B, L\]"),
        ({"item_genres": np.zeros((2, 4), np.float32)},
         r"item_genres \(2, 4\) must be item \(2,\) plus \[3\] genres"),
        ({"item_year": np.array([0, 1, 2])}, r"item_year \(3,\) must match item \(2,\)"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            model({**batch, **change})
    with pytest.raises(ValueError, match=r"history embeddings \(2, 5, 8\) must be \[B, L, E\] for "
                                         r"history \(2, 6\)"):
        layers.pool_history(np.zeros((2, 5, E), np.float32), _history()[1], "mean", 0.0)


def _factorisation(**overrides):
    """The TFRS tutorial's towers: a user id and an item id embedding, nothing else."""
    fields = {"embed_dim": E, "hidden_dims": (), "out_dim": E, "use_features": False,
              "history_pooling": "none", "output_layer": False, **overrides}
    vocab = Vocabularies(num_users=5, num_items=20, num_genres=3, history_len=L)
    cfg = ModelConfig(**fields)
    with jax.set_mesh(_mesh()), nnx.logical_axis_rules(sharding.RULES):
        return cfg, vocab, TwoTower(cfg, vocab, nnx.Rngs(0))


def test_towers_without_history_or_output_layer_are_normalised_embeddings():
    cfg, vocab, model = _factorisation()
    model.eval()
    assert input_names(cfg, vocab) == ("item", "user")  # no history is built or sent
    assert model.query_mlp is None and model.item_mlp is None
    q, c, _ = model({"user": np.array([1, 3]), "item": np.array([2, 7])})  # no history needed
    user, item = (np.asarray(t.embedding[...])[rows] for t, rows in
                  ((model.user_table, [1, 3]), (model.item_table, [2, 7])))
    np.testing.assert_allclose(np.asarray(q), user / np.linalg.norm(user, axis=1, keepdims=True),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(c), item / np.linalg.norm(item, axis=1, keepdims=True),
                               rtol=1e-5)
    # A batch that carries a history anyway (serving always sends one) gives the same vectors.
    with_history = model.embed_query({"user": np.array([1, 3]), "history": _history()[1]})
    np.testing.assert_array_equal(np.asarray(with_history), np.asarray(q))
    with pytest.raises(ValueError, match=r"item \(3,\) must be \[B\].*user \(2,\)"):
        model({"user": np.array([1, 3]), "item": np.array([2, 7, 1])})


def test_towers_without_an_output_layer_refuse_widths_that_differ():
    with pytest.raises(ConfigError, match=r"model.output_layer=False: false needs model.hidden_dims"):
        ModelConfig(hidden_dims=(16,), output_layer=False)
    with pytest.raises(ConfigError, match=r"item vector its embeddings, 96 wide"):
        ModelConfig(embed_dim=32, hidden_dims=(), out_dim=32, output_layer=False)
    with pytest.raises(ConfigError, match=r"query vector its embeddings side by side, 16 wide"):
        _factorisation(history_pooling="mean")  # history and user id: 2 x 8 wide, out_dim 8
    with pytest.raises(ConfigError, match=r"history_pooling='none': none leaves the query tower"):
        ModelConfig(history_pooling="none", use_user_id=False, use_features=False)
