"""Streaming logQ (Yi et al. 2019): frequency estimates on a known stream, and inside the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from recsys import sharding
from recsys.config import MeshConfig, ModelConfig, TrainConfig
from recsys.models import losses
from recsys.models.logq import StreamingLogQ
from recsys.models.two_tower import TwoTower, Vocabularies
from recsys.train import checkpoint, steps
from recsys.train import state as state_lib
from recsys.train.negatives import Negatives


def _zipf_stream(num_items, batch, num_steps, seed=0):
    """[steps, batch] item ids drawn i.i.d. with p(i) ~ 1 / i, and those probabilities."""
    p = 1.0 / np.arange(1, num_items + 1)
    p /= p.sum()
    ids = np.random.default_rng(seed).choice(num_items, (num_steps, batch), p=p)
    return ids.astype(np.int32), p


def _run(estimator, stream):
    @jax.jit
    def run(stream):
        def body(state, step_ids):
            step, ids = step_ids
            return estimator.observe(state, ids, step), None
        steps_ = jnp.arange(1, stream.shape[0] + 1)
        return jax.lax.scan(body, estimator.init(), (steps_, stream))[0]
    return run(stream)


@pytest.mark.parametrize("batch,num_steps", [(256, 4000), (1024, 2000)])
def test_estimate_is_within_ten_percent_for_the_100_most_frequent_items(batch, num_steps):
    """Zipf stream over 2000 items. The 100th item is seen ~1200 times in all, so its sampling
    error alone is ~3%; at batch 1024 the top item appears ~125 times per step, and those
    duplicates must count as occurrences for the estimate to be right."""
    stream, p = _zipf_stream(2000, batch, num_steps)
    estimator = StreamingLogQ(num_buckets=2048, learning_rate=TrainConfig().logq_learning_rate)
    state = _run(estimator, stream)
    top = np.argsort(-p)[:100]
    q = np.exp(np.asarray(estimator.log_q(state, jnp.asarray(top), batch)))
    np.testing.assert_array_less(np.abs(q / p[top] - 1), 0.10)
    assert np.asarray(state["last_seen"])[top].min() > num_steps - 50  # all recently seen


def test_duplicates_are_counted_independently_of_their_order():
    stream, _ = _zipf_stream(300, 256, 50, seed=1)
    shuffled = np.random.default_rng(2).permuted(stream, axis=1)
    estimator = StreamingLogQ(num_buckets=384, learning_rate=0.05)
    a, b = _run(estimator, stream), _run(estimator, shuffled)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_hashing_into_fewer_buckets_merges_colliding_items():
    estimator = StreamingLogQ(num_buckets=4, learning_rate=0.5)  # running mean for 2 sightings
    ids = jnp.array([1, 5, 2, 2], jnp.int32)  # 1 and 5 share bucket 1; 2 appears twice
    state = estimator.observe(estimator.init(), ids, 3)
    np.testing.assert_array_equal(np.asarray(state["last_seen"]), [0, 3, 3, 0])
    # first sighting: 3 steps since the start, shared by the 2 sightings of that step
    np.testing.assert_allclose(np.asarray(state["gap"]), [0, 1.5, 1.5, 0])
    state = estimator.observe(state, jnp.array([5, 9, 9, 9], jnp.int32), 4)
    # bucket 1: 4 more sightings, gap 1 since step 3 -> 1/4 each; past its 2-sighting warm-up
    # each moves the average by a = 0.5
    np.testing.assert_allclose(np.asarray(state["gap"])[1], 0.5 ** 4 * 1.5 + (1 - 0.5 ** 4) * 0.25)
    np.testing.assert_array_equal(np.asarray(state["sightings"]), [0, 6, 2, 0])


def test_train_step_counts_items_and_corrects_with_the_streaming_estimate():
    vocab = Vocabularies(num_users=64, num_items=200, num_genres=3)
    model_cfg = ModelConfig(embed_dim=8, hidden_dims=(8,), out_dim=8, use_features=False)
    # The loss is checked at step 1, before any update, so the rate does not matter (it must be > 0).
    tc = TrainConfig(logq_estimate="streaming", logq_learning_rate=0.1, optimizer="sgd",
                     learning_rate=1e-3)
    mesh = sharding.make_mesh(MeshConfig(data=4, model=2))
    optimizers = state_lib.make_optimizer(tc, logq_rows=vocab.num_items)
    assert optimizers.logq.num_buckets == 256  # the item rows, padded like the table
    graphdef, state, shardings = state_lib.create(lambda rngs: TwoTower(model_cfg, vocab, rngs),
                                                  optimizers, 0, mesh)
    for key in ("last_seen", "gap", "sightings"):  # sharded like the table rows
        assert state[2]["logq"][key][...].sharding.spec == P(("data", "model"))
    assert "logq" not in state[1]  # beside the optimizer, not inside it
    train_step = steps.make_train_step(graphdef, steps.retrieval_loss, tc, shardings, mesh)
    rng = np.random.default_rng(0)
    batch = {"user": rng.integers(1, 64, 32).astype(np.int32),
             "history": rng.integers(0, 200, (32, 4)).astype(np.int32),
             "item": np.repeat(np.arange(1, 17, dtype=np.int32), 2),  # each item twice
             "negatives": Negatives(log_q=np.zeros(32, np.float32))}  # the estimate replaces it
    model = steps.model_of(graphdef, state)
    q_BxD, c_BxD, temperature = model(batch)
    expected = losses.in_batch_softmax_loss(q_BxD, c_BxD, temperature, batch["item"],
                                            np.full(32, np.log(2 / 32), np.float32))
    with jax.set_mesh(mesh):
        for step in (1, 2):
            state, loss = train_step(state, sharding.shard_batch(batch, mesh))
            if step == 1:  # gap 1/2 per sighting: q = 2 / 32, the item's share of the batch
                np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    last_seen = np.asarray(state[2]["logq"]["last_seen"][...])
    assert set(np.flatnonzero(last_seen)) == set(range(1, 17)) and last_seen[1] == 2
    np.testing.assert_allclose(np.asarray(state[2]["logq"]["gap"][...])[1:17], 0.5)


def test_streaming_estimate_checkpoints_and_continues_on_another_mesh(tmp_path):
    vocab = Vocabularies(num_users=64, num_items=200, num_genres=3)
    model_cfg = ModelConfig(embed_dim=8, hidden_dims=(8,), out_dim=8, use_features=False)
    tc = TrainConfig(logq_estimate="streaming", logq_learning_rate=0.1, optimizer="sgd")
    optimizers = state_lib.make_optimizer(tc, logq_rows=vocab.num_items)

    def build(rngs):
        return TwoTower(model_cfg, vocab, rngs)

    rng = np.random.default_rng(1)
    batches = [{"user": rng.integers(1, 64, 32).astype(np.int32),
                "history": rng.integers(0, 200, (32, 4)).astype(np.int32),
                "item": rng.integers(1, 40, 32).astype(np.int32),
                "negatives": Negatives(log_q=np.zeros(32, np.float32))} for _ in range(2)]

    def run(train_step, state, mesh, batch):
        with jax.set_mesh(mesh):
            return train_step(state, sharding.shard_batch(batch, mesh))[0]

    mesh = sharding.make_mesh(MeshConfig(data=4, model=2))
    graphdef, state, shardings = state_lib.create(build, optimizers, 0, mesh)
    train_step = steps.make_train_step(graphdef, steps.retrieval_loss, tc, shardings, mesh)
    state = run(train_step, state, mesh, batches[0])
    mngr = checkpoint.make_manager(tmp_path / "ckpt", tc)
    with jax.set_mesh(mesh):
        checkpoint.save(mngr, 1, state, {"step": 1})
    checkpoint.wait(mngr)
    other = sharding.make_mesh(MeshConfig(data=2, model=4))
    _, target = state_lib.abstract(build, optimizers, 0, other)
    restored, _ = checkpoint.restore_or_none(mngr, target, {})
    mngr.close()
    for key in ("last_seen", "gap", "sightings"):
        got = restored[2]["logq"][key][...]
        assert got.sharding.mesh.shape["model"] == 4
        np.testing.assert_array_equal(np.asarray(got), np.asarray(state[2]["logq"][key][...]))
    # One more step from each: the estimates agree exactly (they depend only on the items).
    straight = run(train_step, state, mesh, batches[1])
    other_step = steps.make_train_step(graphdef, steps.retrieval_loss, tc,
                                       jax.tree.map(lambda x: x.sharding, target), other)
    resumed = run(other_step, restored, other, batches[1])
    for key in ("last_seen", "gap", "sightings"):
        np.testing.assert_array_equal(np.asarray(resumed[2]["logq"][key][...]),
                                      np.asarray(straight[2]["logq"][key][...]))


def test_no_streaming_estimate_unless_asked_for_a_retrieval_model():
    tc = TrainConfig(logq_estimate="streaming")
    assert state_lib.make_optimizer(tc).logq is None  # e.g. the ranker passes no item rows
    assert state_lib.make_optimizer(TrainConfig(), logq_rows=100).logq is None
    off = TrainConfig(logq_estimate="streaming", logq_correction=False)
    assert state_lib.make_optimizer(off, logq_rows=100).logq is None
    buckets = TrainConfig(logq_estimate="streaming", logq_buckets=1000)
    assert state_lib.make_optimizer(buckets, logq_rows=100).logq.num_buckets == 1024
