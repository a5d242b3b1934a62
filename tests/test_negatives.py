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


def _mesh(n=1):
    return sharding.make_mesh(MeshConfig(data=n, model=1), devices=jax.devices()[:n])


def _sampler(tiny, tmp_path, **train):
    cfg, ds, positions = tiny
    tc = dataclasses.replace(cfg.train, **{"uniform_negatives": 8, "mined_negatives": 3,
                                           "mine_ranks": (2, 30), "hard_negatives": 5, **train})
    miner = mining.MinedNegatives(ds, positions, tc, tmp_path) if tc.mined_negatives else None
    if miner is not None:  # a known table instead of a search
        rng = np.random.default_rng(0)
        miner.items_PxH = rng.integers(0, ds.num_items + 1, miner.items_PxH.shape).astype(np.int32)
        miner.log_q_P = -np.log(rng.integers(1, 20, len(positions))).astype(np.float32)
    return tc, negatives.Sampler(ds, positions, tc, _mesh(), miner), miner


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
    items_BxH = miner.items_PxH[:6]
    for key, value in item_inputs(ds.features, items_BxH).items():
        np.testing.assert_array_equal(neg.mined[key], value)
    np.testing.assert_array_equal(neg.mined_log_q, np.repeat(miner.log_q_P[:6, None], 3, axis=1))
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
    assert {f for f in fields if getattr(neg, f) is None} == absent


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
])
def test_negatives_that_do_not_fit_the_batch_name_both_shapes(fields, message):
    with pytest.raises(ValueError, match=message):
        Negatives(**fields).check(4)
