"""The asynchronous training loop: prefetching, several steps per call, bf16, chunked logits and
the automatic table optimizer change how fast a run goes, not what it computes (bf16 aside)."""

from __future__ import annotations

import dataclasses
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys import config as config_lib
from recsys import pipeline, sharding
from recsys.config import TrainConfig
from recsys.models import losses
from recsys.train import prefetch
from recsys.train import state as state_lib
from recsys.train.loop import train_retrieval

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny(**train):
    cfg = config_lib.load(ROOT / "configs" / "tiny.py")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


@pytest.fixture(scope="module")
def tiny_data():
    return pipeline.load_data(tiny().data)


def run(cfg, ds, workdir):
    mesh = sharding.make_mesh(cfg.mesh)
    trained = train_retrieval(cfg, ds, workdir, mesh)
    params = [np.asarray(x) for x in jax.tree.leaves(trained.state)
              if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    return trained.metrics, params


def test_prefetch_and_steps_per_call_compute_what_one_step_at_a_time_does(tiny_data, tmp_path):
    """Same final loss and parameters: batches built ahead on a thread, 4 steps per jitted call
    (a lax.scan; the remainder of 22 steps runs as single steps), against the plain loop."""
    base = {"num_steps": 22, "log_every": 5, "optimizer": "adam"}
    plain, plain_params = run(tiny(prefetch=0, steps_per_call=1, **base), tiny_data, tmp_path / "a")
    fast, fast_params = run(tiny(prefetch=3, steps_per_call=4, **base), tiny_data, tmp_path / "b")
    assert fast["train/steps"] == plain["train/steps"] == 22
    np.testing.assert_allclose(fast["train/final_loss"], plain["train/final_loss"], rtol=1e-5)
    for a, b in zip(plain_params, fast_params):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The loss curve is logged for the same steps either way.
    logged = [(tmp_path / d / "metrics.jsonl").read_text().count('"train/loss"') for d in "ab"]
    assert logged[0] == logged[1] == 5  # steps 5, 10, 15, 20 and the last one, 22


def test_end_to_end_throughput_and_its_parts_are_reported(tiny_data, tmp_path):
    metrics, _ = run(tiny(num_steps=12), tiny_data, tmp_path)
    for key in ("train/examples_per_sec", "train/device_examples_per_sec", "train/seconds",
                "train/host_input_seconds", "train/input_wait_seconds"):
        assert metrics[key] > 0 or key == "train/input_wait_seconds", key
    # End to end includes everything the device-only figure leaves out.
    assert metrics["train/examples_per_sec"] <= metrics["train/device_examples_per_sec"] * 1.05
    assert metrics["train/host_input_seconds"] < metrics["train/seconds"] * 5


def test_bfloat16_compute_stays_close_to_float32_over_50_steps(tiny_data, tmp_path):
    """bf16 matmuls and logits with float32 parameters, optimizer state and softmax: the loss
    after 50 steps is within 2% of float32's."""
    f32, _ = run(tiny(num_steps=50, learning_rate=0.01), tiny_data, tmp_path / "f32")
    bf16, params = run(tiny(num_steps=50, learning_rate=0.01, compute_dtype="bfloat16"),
                       tiny_data, tmp_path / "bf16")
    assert all(p.dtype != jnp.bfloat16 for p in params)  # parameters and moments stay float32
    assert abs(bf16["train/final_loss"] - f32["train/final_loss"]) <= 0.02 * f32["train/final_loss"]


def test_chunked_logits_give_the_same_loss_and_gradients():
    rng = np.random.default_rng(0)
    b, d, h, m = 96, 8, 3, 5
    q = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    item = jnp.asarray(rng.integers(1, 20, b), jnp.int32)
    log_q = jnp.asarray(rng.normal(size=b), jnp.float32)
    extra = (losses.NegativeSource(jnp.asarray(rng.normal(size=(m, d)), jnp.float32),
                                   jnp.asarray(rng.integers(0, 20, m), jnp.int32), jnp.zeros(m)),
             losses.NegativeSource(jnp.asarray(rng.normal(size=(b, h, d)), jnp.float32),
                                   jnp.asarray(rng.integers(0, 20, (b, h)), jnp.int32),
                                   jnp.asarray(rng.normal(size=(b, h)), jnp.float32)))

    def loss(q, c, chunk):
        return losses.sampled_softmax_loss(q, c, 0.1, item, log_q_B=log_q, extra=extra,
                                           hard_negatives=10, row_chunk=chunk)

    whole, whole_grads = jax.value_and_grad(loss, argnums=(0, 1))(q, c, 0)
    for chunk in (32, 40, 7):  # 40 and 7 do not divide 96: the nearest divisor is used
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(q, c, chunk)
        np.testing.assert_allclose(value, whole, rtol=1e-6)
        for g, w in zip(grads, whole_grads):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_auto_embedding_optimizer_goes_sparse_only_for_tables_larger_than_a_step():
    adam, adagrad = TrainConfig(optimizer="adam"), TrainConfig(optimizer="adagrad")
    assert state_lib.embedding_rule(adam, table_rows=10_000_000, lookups_per_step=50_000) == "lazy_adam"
    assert state_lib.embedding_rule(adagrad, 10_000_000, 50_000) == "rowwise_adagrad"
    assert state_lib.embedding_rule(adam, table_rows=10_000, lookups_per_step=50_000) == "dense"
    assert state_lib.embedding_rule(TrainConfig(optimizer="sgd"), 10_000_000, 50_000) == "dense"
    assert state_lib.embedding_rule(adam) == "dense"  # sizes unknown
    explicit = TrainConfig(embedding_optimizer="rowwise_adagrad")
    assert state_lib.embedding_rule(explicit, 10, 50_000) == "rowwise_adagrad"


def test_prefetcher_raises_a_build_error_at_the_item_that_failed_and_closes_early():
    def build(i):
        if i == 3:
            raise ValueError("bad row 3")
        return i * 10

    with prefetch.Prefetcher(build, range(6), depth=2) as batches:
        got = [batches.get() for _ in range(3)]
        assert got == [(0, 0), (1, 10), (2, 20)]
        with pytest.raises(ValueError, match="bad row 3"):
            batches.get()
    # Closing before the end stops the thread (nothing left running, nothing blocked).
    slow = prefetch.Prefetcher(lambda i: i, range(10_000), depth=1)
    assert slow.get() == (0, 0)
    slow.close()
    assert not any(t.name == "recsys-prefetch" and t.is_alive() for t in threading.enumerate())
