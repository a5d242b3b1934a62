"""The Negatives structure: built per batch with each source's correction, handed whole to the loss."""

import dataclasses
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from recsys import config as config_lib
from recsys import pipeline, sharding
from recsys.config import MeshConfig, TrainConfig
from recsys.data.batches import example_inputs, item_inputs
from recsys.eval import protocol
from recsys.models import losses
from recsys.models.two_tower import TwoTower, Vocabularies
from recsys.train import mining, negatives, steps
from recsys.train.negatives import Negatives

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    cfg = config_lib.load(ROOT / "configs" / "tiny.py")
    ds = pipeline.load_data(cfg.data)
    return cfg, ds, ds.train_positions(cfg.data.trained_on)


def with_fields(tc, **fields):
    return dataclasses.replace(tc, **fields)


def _mesh(n=1):
    return sharding.make_mesh(MeshConfig(data=n, model=1), devices=jax.devices()[:n])


def _sampler(tiny, tmp_path, **train):
    cfg, ds, positions = tiny
    tc = with_fields(cfg.train, **{"uniform_negatives": 8, "mined_negatives": 3,
                                   "mine_ranks": (2, 30), "hard_negatives": 5,
                                   "mined_vectors": "embed", **train})
    miner = mining.MinedNegatives(ds, positions, tc, tmp_path) if tc.mined_negatives else None
    if miner is not None:  # a known table, in use from step 0, instead of a search
        rng = np.random.default_rng(0)
        vectors_VxD = rng.standard_normal((ds.items.size, 4)).astype(np.float32)
        miner.install(0, mining.Table(
            rng.integers(0, ds.num_items + 1, (len(positions), 3)).astype(np.int32),
            -np.log(rng.integers(1, 20, len(positions))).astype(np.float32),
            vectors_VxD if miner.cached else None))
    return tc, negatives.Sampler(ds.features, ds.item_counts(positions), tc, _mesh(),
                                 miner), miner


def _table(miner):
    return miner._table(0)


def test_sampler_gives_every_source_with_its_own_correction(tiny, tmp_path):
    _, ds, positions = tiny
    tc, sampler, miner = _sampler(tiny, tmp_path)
    positions_B = positions[:6]
    item_B = ds.seq_items[positions_B]
    neg = sampler.at(3, positions_B, item_B)
    # In-batch: training-count log q of each positive.
    counts_V = losses.log_sampling_probability(ds.item_counts(positions))
    np.testing.assert_array_equal(neg.log_q, counts_V[item_B])
    # Uniform: the draw of (seed, step), corrected by log(1/N).
    drawn, log_q_M = negatives.uniform(ds.features, ds.num_items, 8, tc.seed, 3)
    for key, value in drawn.items():
        np.testing.assert_array_equal(neg.uniform[key], value)
    np.testing.assert_array_equal(neg.uniform_log_q, log_q_M)
    np.testing.assert_allclose(neg.uniform_log_q, -np.log(ds.num_items))
    # Mined: the table's rows for these positions, each row's band log q on every column.
    table = _table(miner)
    items_BxH = table.items_PxH[:6]
    for key, value in item_inputs(ds.features, items_BxH).items():
        np.testing.assert_array_equal(neg.mined[key], value)
    np.testing.assert_array_equal(neg.mined_log_q, np.repeat(table.log_q_P[:6, None], 3, axis=1))
    assert neg.mined_vectors is None  # train.mined_vectors="embed": the step embeds them
    assert neg.hard_k == 5 and neg.remove_accidental_hits == tc.remove_accidental_hits
    neg.check(6)


@pytest.mark.parametrize("train, absent", [
    ({"mined_correction": "none"}, {"mined_log_q"}),
    ({"logq_correction": False}, {"log_q", "uniform_log_q", "mined_log_q"}),
    ({"logq_estimate": "streaming"}, {"log_q"}),  # the train step fills it from the estimate
    ({"uniform_negatives": 0, "mined_negatives": 0},
     {"uniform", "uniform_log_q", "mined", "mined_log_q"}),
])
def test_sources_and_corrections_that_are_off_are_none(tiny, tmp_path, train, absent):
    _, ds, positions = tiny
    _, sampler, _ = _sampler(tiny, tmp_path, **train)
    neg = sampler.at(0, positions[:4], ds.seq_items[positions[:4]])
    fields = {f.name for f in dataclasses.fields(Negatives)} - {"hard_k", "remove_accidental_hits"}
    assert {f for f in fields if getattr(neg, f) is None} == absent | {"mined_vectors"}


def test_mined_uniform_correction_weighs_mined_items_like_uniform_draws(tiny, tmp_path):
    _, ds, positions = tiny
    _, sampler, _ = _sampler(tiny, tmp_path, mined_correction="uniform")
    neg = sampler.at(0, positions[:4], ds.seq_items[positions[:4]])
    assert neg.mined_log_q.shape == (4, 3)
    np.testing.assert_allclose(neg.mined_log_q, -np.log(ds.num_items))


def test_negatives_are_a_pytree_whose_settings_are_static(tiny, tmp_path):
    _, ds, positions = tiny
    _, sampler, _ = _sampler(tiny, tmp_path)
    neg = sampler.at(0, positions[:8], ds.seq_items[positions[:8]])
    assert len(jax.tree.leaves(neg)) == 1 + 3 + 1 + 3 + 1  # log q, items of 2 sources, log qs
    other = dataclasses.replace(neg, hard_k=7)
    assert jax.tree.structure(other) != jax.tree.structure(neg)  # k is compiled in
    mesh = _mesh(8)
    placed = sharding.shard_batch({"negatives": neg}, mesh)["negatives"]
    assert isinstance(placed, Negatives) and placed.hard_k == neg.hard_k
    assert placed.mined["item"].sharding.spec == sharding.batch_spec()
    np.testing.assert_array_equal(np.asarray(placed.mined_log_q), neg.mined_log_q)


def test_retrieval_loss_hands_every_source_to_the_sampled_softmax(tiny, tmp_path):
    cfg, ds, positions = tiny
    _, sampler, _ = _sampler(tiny, tmp_path)
    vocab = Vocabularies(num_users=ds.users.size, num_items=ds.items.size,
                         num_genres=ds.features.item_genres.shape[1],
                         user_cardinalities=ds.features.user_cardinalities)
    with jax.set_mesh(_mesh()), nnx.logical_axis_rules(sharding.RULES):
        model = TwoTower(cfg.model, vocab, nnx.Rngs(0))
    model.eval()
    positions_B = positions[:16]
    batch = example_inputs(ds, positions_B)
    batch["negatives"] = neg = sampler.at(2, positions_B, batch["item"])
    got = steps.retrieval_loss(model, batch, TrainConfig())
    q, c, t = model(batch)
    want = losses.sampled_softmax_loss(
        q, c, t, batch["item"], log_q_B=neg.log_q, hard_negatives=5,
        extra=(losses.NegativeSource(model.embed_items(neg.uniform), neg.uniform["item"],
                                     neg.uniform_log_q),
               losses.NegativeSource(model.embed_items(neg.mined), neg.mined["item"],
                                     neg.mined_log_q)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("fields, message", [
    ({"log_q": np.zeros(5)}, r"log_q \(5,\) must be \[B\] for the batch's B = 4"),
    ({"uniform": {"item": np.ones((4, 2), np.int32)}}, r"uniform item \(4, 2\) must be \[M\]"),
    ({"uniform": {"item": np.ones(6, np.int32)}, "uniform_log_q": np.zeros(5)},
     r"uniform_log_q \(5,\) must match uniform item \(6,\)"),
    ({"mined": {"item": np.ones((3, 2), np.int32)}}, r"mined item \(3, 2\) must be \[B, H\].* B = 4"),
    ({"mined": {"item": np.ones((4, 2), np.int32)}, "mined_log_q": np.zeros((4, 3))},
     r"mined_log_q \(4, 3\) must match mined item \(4, 2\)"),
    ({"mined": {"item": np.ones((4, 2), np.int32)}, "mined_vectors": np.zeros((4, 3, 8))},
     r"mined_vectors \(4, 3, 8\) must be \[B, H, D\] for mined item \(4, 2\)"),
    ({"mined_vectors": np.zeros((4, 2, 8))}, r"mined_vectors \(4, 2, 8\) need mined items"),
])
def test_negatives_that_do_not_fit_the_batch_name_both_shapes(fields, message):
    with pytest.raises(ValueError, match=message):
        Negatives(**fields).check(4)


def test_cached_mined_vectors_replace_the_mined_inputs(tiny, tmp_path):
    _, ds, positions = tiny
    _, sampler, miner = _sampler(tiny, tmp_path, mined_vectors="cached")
    positions_B = positions[:6]
    neg = sampler.at(3, positions_B, ds.seq_items[positions_B])
    table = _table(miner)
    items_BxH = table.items_PxH[:6]
    assert set(neg.mined) == {"item"}  # ids only: for masking; the vectors come cached
    np.testing.assert_array_equal(neg.mined["item"], items_BxH)
    assert neg.mined_vectors.shape == (6, 3, 4) and neg.mined_vectors.dtype == np.float32
    np.testing.assert_array_equal(neg.mined_vectors, table.vectors_VxD[items_BxH])
    neg.check(6)
    assert len(jax.tree.leaves(neg)) == 1 + 3 + 1 + 1 + 1 + 1  # uniform inputs, mined item, vectors
    placed = sharding.shard_batch({"negatives": neg}, _mesh(2))["negatives"]
    assert placed.mined_vectors.sharding.spec == sharding.batch_spec()


def _model_and_batch(tiny, sampler, step=2):
    cfg, ds, positions = tiny
    with jax.set_mesh(_mesh()), nnx.logical_axis_rules(sharding.RULES):
        model = TwoTower(cfg.model, _vocab(ds), nnx.Rngs(0))
    model.eval()
    positions_B = positions[:16]
    batch = example_inputs(ds, positions_B)
    batch["negatives"] = sampler.at(step, positions_B, batch["item"])
    return model, batch


def _vocab(ds):
    return Vocabularies(num_users=ds.users.size, num_items=ds.items.size,
                        num_genres=ds.features.item_genres.shape[1],
                        user_cardinalities=ds.features.user_cardinalities)


def test_cached_vectors_of_the_same_model_give_the_embedded_loss_without_its_gradient(tiny,
                                                                                      tmp_path):
    _, ds, _ = tiny
    # Every negative kept (no hard-negative selection), so each mined one gets a gradient.
    _, embed_sampler, embed_miner = _sampler(tiny, tmp_path / "embed", hard_negatives=0)
    model, batch = _model_and_batch(tiny, embed_sampler)
    # The cached path with the model's own item vectors: the same logits, masks and loss.
    _, cached_sampler, cached_miner = _sampler(tiny, tmp_path / "cached", hard_negatives=0,
                                               mined_vectors="cached")
    vectors_VxD = protocol.item_vectors(model, ds.features)
    cached_miner.install(0, dataclasses.replace(_table(embed_miner), vectors_VxD=vectors_VxD))
    _, cached = _model_and_batch(tiny, cached_sampler)
    want = steps.retrieval_loss(model, batch, TrainConfig())
    got = steps.retrieval_loss(model, cached, TrainConfig())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
    # Gradients reach an item's row through the batch's own rows only: a row that is only a
    # mined negative gets one when embedded, none when cached.
    mined_only = (set(batch["negatives"].mined["item"].ravel().tolist()) - {0}
                  - set(batch["item"].tolist()) - set(batch["history"].ravel().tolist())
                  - set(batch["negatives"].uniform["item"].tolist()))
    rows = np.array(sorted(mined_only))
    assert len(rows)

    def row_grads(b):
        grads = nnx.grad(lambda m: steps.retrieval_loss(m, b, TrainConfig()))(model)
        return np.asarray(grads.item_table.embedding[...])[rows]

    assert np.abs(row_grads(batch)).sum() > 0
    np.testing.assert_array_equal(row_grads(cached), 0)


def test_cached_mined_vectors_are_zeros_before_the_first_table(tiny, tmp_path):
    cfg, ds, positions = tiny
    tc = with_fields(cfg.train, mined_negatives=3, mine_ranks=(2, 30), mined_vectors="cached")
    miner = mining.MinedNegatives(ds, positions, tc, tmp_path)
    with pytest.raises(RuntimeError, match="restore"):
        miner.at(0, positions[:4])
    with jax.set_mesh(_mesh()), nnx.logical_axis_rules(sharding.RULES):
        model = TwoTower(cfg.model, _vocab(ds), nnx.Rngs(0))
    miner.restore(model, 0)
    items, _, vectors = miner.at(0, positions[:4])
    assert vectors.shape == (4, 3, cfg.model.out_dim) and not vectors.any() and not items.any()
    miner.close()
