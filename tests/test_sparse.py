"""Sparse embedding updates: row-wise Adagrad and lazy Adam against numpy, inside the sharded step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recsys import config as config_lib
from recsys import sharding
from recsys.config import ConfigError, MeshConfig, ModelConfig, TrainConfig
from recsys.models import layers
from recsys.models.two_tower import TwoTower, Vocabularies
from recsys.train import checkpoint, sparse, steps
from recsys.train import state as state_lib
from recsys.train.negatives import Negatives

V, E = 128, 4  # one padded table: 16 rows per device on 8 devices


class Toy(nnx.Module):
    """score = sum of looked-up rows (several lookups, with duplicates) . w."""

    def __init__(self, rngs, dim=E):
        self.table = layers.table(V, dim, rngs, scale=0.5)
        self.w = nnx.Param(jnp.linspace(-1.0, 1.0, dim))

    def __call__(self, batch):
        rows_BxE = self.table(batch["ids"]).sum(axis=1) + self.table(batch["extra"])
        return rows_BxE @ self.w[...]


def toy_loss(model, batch, cfg):
    return jnp.mean((model(batch) - batch["y"]) ** 2)


def _mesh(data, model):
    return sharding.make_mesh(MeshConfig(data=data, model=model),
                              devices=jax.devices()[:data * model])


def _toy_batch(rng, touched):
    ids = rng.choice(touched, (16, 3))
    ids[:, 1] = ids[:, 0]  # duplicates within a row, and across rows
    return {"ids": ids.astype(np.int32), "extra": rng.choice(touched, 16).astype(np.int32),
            "y": rng.standard_normal(16).astype(np.float32)}


def _run(tc, batches, shape=(4, 2), dim=E):
    """Table, table optimizer state and dense weight before and after each step (numpy)."""
    mesh = _mesh(*shape)
    graphdef, state, shardings = state_lib.create(lambda rngs: Toy(rngs, dim),
                                                  state_lib.make_optimizer(tc), 0, mesh)
    train_step = steps.make_train_step(graphdef, toy_loss, tc, shardings, mesh)
    snapshots = [_snapshot(state)]
    with jax.set_mesh(mesh):
        for batch in batches:
            state, _ = train_step(state, sharding.shard_batch(batch, mesh))
            snapshots.append(_snapshot(state))
    return graphdef, snapshots


def _snapshot(state):
    model, opt = state[0], state[1]
    tables = {k: np.asarray(v[...]) for k, v in opt["tables"]["table"].items()} \
        if "tables" in opt else {}
    return {"table": np.asarray(model["table"]["embedding"][...]),
            "w": np.asarray(model["w"][...]), **tables}


def _table_grad(graphdef, snap, batch):
    """d loss / d table [V, E] and d loss / d w, by dense autodiff on one device."""
    def loss(table, w):
        rows = table[batch["ids"]].sum(axis=1) + table[batch["extra"]]
        return jnp.mean((rows @ w - batch["y"]) ** 2)
    g_table, g_w = jax.grad(loss, argnums=(0, 1))(jnp.asarray(snap["table"]), jnp.asarray(snap["w"]))
    return np.asarray(g_table, np.float64), np.asarray(g_w, np.float64)


def _reference_step(name, lr, before, g, touched_rows, step):
    """numpy row-wise Adagrad / lazy Adam on the touched rows only."""
    after = {k: v.astype(np.float64).copy() for k, v in before.items() if k != "w"}
    r = touched_rows
    if name == "rowwise_adagrad":
        after["accumulator"][r] += np.mean(g[r] ** 2, axis=1)
        after["table"][r] -= lr * g[r] / np.sqrt(after["accumulator"][r] + 1e-7)[:, None]
    else:
        after["mu"][r] = 0.9 * after["mu"][r] + 0.1 * g[r]
        after["nu"][r] = 0.999 * after["nu"][r] + 0.001 * g[r] ** 2
        mu_hat, nu_hat = after["mu"][r] / (1 - 0.9 ** step), after["nu"][r] / (1 - 0.999 ** step)
        after["table"][r] -= lr * mu_hat / (np.sqrt(nu_hat) + 1e-8)
    return after


@pytest.mark.parametrize("name", ["rowwise_adagrad", "lazy_adam"])
def test_sparse_update_matches_numpy_and_leaves_other_rows_bit_identical(name):
    lr = 0.05
    tc = TrainConfig(optimizer="sgd", learning_rate=0.1, embedding_optimizer=name,
                     embedding_learning_rate=lr)
    rng = np.random.default_rng(0)
    touched = [rng.choice(np.arange(1, V), 12, replace=False) for _ in range(2)]
    batches = [_toy_batch(rng, t) for t in touched]  # step 2 leaves most of step 1's rows alone
    graphdef, snaps = _run(tc, batches)
    for step, batch in enumerate(batches, start=1):
        before, after = snaps[step - 1], snaps[step]
        g_table, g_w = _table_grad(graphdef, before, batch)
        rows = np.unique(np.concatenate([batch["ids"].ravel(), batch["extra"]]))
        expected = _reference_step(name, lr, before, g_table, rows, step)
        untouched = np.setdiff1d(np.arange(V), rows)
        for key in expected:
            np.testing.assert_array_equal(after[key][untouched], before[key][untouched], key)
            np.testing.assert_allclose(after[key][rows], expected[key][rows], rtol=2e-5,
                                       atol=1e-6, err_msg=key)
            assert not np.allclose(after[key][rows], before[key][rows]), key
        np.testing.assert_allclose(after["w"], before["w"] - 0.1 * g_w, rtol=1e-5)  # optax sgd


@pytest.mark.parametrize("name,dense,dim", [("lazy_adam", "adam", E),
                                            ("rowwise_adagrad", "adagrad", 1)])
def test_touching_every_row_equals_the_dense_optax_update(name, dense, dim):
    """Lazy Adam with every row touched is Adam; row-wise Adagrad with one column is Adagrad."""
    rng = np.random.default_rng(1)
    batches = [{"ids": rng.permutation(V).reshape(16, 8).astype(np.int32),  # every row, each step
                "extra": rng.integers(0, V, 16).astype(np.int32),
                "y": rng.standard_normal(16).astype(np.float32)} for _ in range(3)]
    _, sparse_snaps = _run(TrainConfig(optimizer=dense, learning_rate=0.05,
                                       embedding_optimizer=name), batches, (1, 1), dim)
    mesh = _mesh(1, 1)
    tx = getattr(optax, dense)(0.05)
    graphdef, state, shardings = state_lib.create(lambda rngs: Toy(rngs, dim), tx, 0, mesh)
    train_step = steps.make_train_step(graphdef, toy_loss, TrainConfig(), shardings, mesh)
    with jax.set_mesh(mesh):
        for batch in batches:
            state, _ = train_step(state, sharding.shard_batch(batch, mesh))
    np.testing.assert_allclose(sparse_snaps[-1]["table"], _snapshot(state)["table"], atol=1e-6)


def test_row_gradients_equal_the_rows_of_the_dense_table_gradient():
    """On the two-tower model and retrieval loss: the gathered-row gradient is the dense one."""
    vocab = Vocabularies(num_users=50, num_items=200, num_genres=3)
    cfg = ModelConfig(embed_dim=8, hidden_dims=(8,), out_dim=8, use_features=False)
    tc = TrainConfig()
    rng = np.random.default_rng(2)
    batch = {"user": rng.integers(1, 50, 32).astype(np.int32),
             "history": rng.integers(0, 30, (32, 5)).astype(np.int32),  # many repeats
             "item": rng.integers(1, 30, 32).astype(np.int32),
             "negatives": Negatives(log_q=np.full(32, -3.0, np.float32))}
    with jax.set_mesh(_mesh(1, 1)), nnx.logical_axis_rules(sharding.RULES):
        model = TwoTower(cfg, vocab, nnx.Rngs(0))

    @nnx.jit
    def both(model, batch):
        loss_of = lambda m: steps.retrieval_loss(m, batch, tc)
        dense_loss, dense = nnx.value_and_grad(loss_of)(model)
        loss, grads, rows = sparse.value_and_grads(model, loss_of)
        return dense_loss, dense, loss, grads, rows

    with jax.set_mesh(_mesh(1, 1)):
        dense_loss, dense, loss, grads, rows = both(model, batch)
    np.testing.assert_allclose(loss, dense_loss, rtol=1e-6)
    for path in ("item_table", "user_table"):
        ids = np.asarray(rows[path].ids_U)
        valid = ids < len(np.asarray(dense[path]["embedding"][...]))
        full = np.asarray(dense[path]["embedding"][...])
        np.testing.assert_allclose(np.asarray(rows[path].grads_UxE)[valid], full[ids[valid]],
                                   rtol=1e-6, atol=1e-6)
        others = np.setdiff1d(np.arange(len(full)), ids[valid])
        assert not np.any(full[others])  # the dense gradient has nothing outside those rows
    np.testing.assert_allclose(np.asarray(grads["query_mlp"]["out"]["kernel"][...]),
                               np.asarray(dense["query_mlp"]["out"]["kernel"][...]), atol=1e-6)


def test_table_optimizer_state_checkpoints_and_restores_onto_another_mesh(tmp_path):
    tc = TrainConfig(optimizer="adagrad", embedding_optimizer="lazy_adam", learning_rate=0.05)
    rng = np.random.default_rng(3)
    mesh = _mesh(4, 2)
    graphdef, state, shardings = state_lib.create(Toy, state_lib.make_optimizer(tc), 0, mesh)
    train_step = steps.make_train_step(graphdef, toy_loss, tc, shardings, mesh)
    with jax.set_mesh(mesh):
        state, _ = train_step(state, sharding.shard_batch(_toy_batch(rng, np.arange(1, 40)), mesh))
        mngr = checkpoint.make_manager(tmp_path / "ckpt", tc)
        checkpoint.save(mngr, 1, state, {"step": 1})
        checkpoint.wait(mngr)
    _, target = state_lib.abstract(Toy, state_lib.make_optimizer(tc), 0, _mesh(2, 4))
    restored, meta = checkpoint.restore_or_none(mngr, target, {})
    assert meta["step"] == 1
    saved, got = _snapshot(state), _snapshot(restored)
    assert set(got) == {"table", "w", "mu", "nu"} and np.any(got["mu"])
    for key in saved:
        np.testing.assert_array_equal(got[key], saved[key])
    assert restored[1]["tables"]["table"]["mu"][...].sharding.mesh.shape["model"] == 4


def test_bad_embedding_optimizer_settings_name_the_field():
    cfg = config_lib.Config()
    with pytest.raises(ConfigError, match="train.embedding_optimizer"):
        config_lib.apply_overrides(cfg, ["train.embedding_optimizer=sparse_sgd"])
    with pytest.raises(ConfigError, match="train.embedding_learning_rate"):
        TrainConfig(embedding_optimizer="rowwise_adagrad", embedding_learning_rate=-1.0)
