"""Row-sharded tables on 8 fake devices: golden specs, shard shapes, compiled-step HLO, equality."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from recsys import sharding
from recsys.config import MeshConfig, ModelConfig, RankerConfig, TrainConfig
from recsys.models.ranker import Ranker
from recsys.models.two_tower import TwoTower, Vocabularies
from recsys.train import state as state_lib
from recsys.train import steps
from recsys.train.negatives import Negatives

ROWS = ("data", "model")  # every table's rows are split over both mesh axes
MODEL = ModelConfig(embed_dim=16, hidden_dims=(16,), out_dim=8, use_features=False)
VOCAB = Vocabularies(num_users=1000, num_items=4000, num_genres=3)  # padded to 1024 / 4096 rows


def _mesh(data, model):
    return sharding.make_mesh(MeshConfig(data=data, model=model),
                              devices=jax.devices()[:data * model])


def _specs(abstract) -> dict:
    """{'0/item_table/embedding': spec} with trailing Nones dropped (P(x, None) == P(x))."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        key = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
        spec = tuple(x.sharding.spec)
        while spec and spec[-1] is None:
            spec = spec[:-1]
        out[key] = P(*spec)
    return out


def _two_tower(rngs):
    return TwoTower(MODEL, VOCAB, rngs)


def _batch(rng, b=64, length=6):
    return {"user": rng.integers(1, VOCAB.num_users, b).astype(np.int32),
            "history": rng.integers(0, VOCAB.num_items, (b, length)).astype(np.int32),
            "item": rng.integers(1, VOCAB.num_items, b).astype(np.int32),
            "negatives": Negatives(log_q=rng.uniform(-8, -3, b).astype(np.float32))}


# Golden layouts: every array not listed here must be replicated (P()).
GOLDEN_TWO_TOWER = {
    "dense": {"0/item_table/embedding": P(ROWS), "0/user_table/embedding": P(ROWS),
              "1/opt_state/0/mu/item_table/embedding": P(ROWS),
              "1/opt_state/0/nu/item_table/embedding": P(ROWS),
              "1/opt_state/0/mu/user_table/embedding": P(ROWS),
              "1/opt_state/0/nu/user_table/embedding": P(ROWS)},
    "rowwise_adagrad": {"0/item_table/embedding": P(ROWS), "0/user_table/embedding": P(ROWS),
                        "1/tables/item_table/accumulator": P(ROWS),
                        "1/tables/user_table/accumulator": P(ROWS)},
    "lazy_adam": {"0/item_table/embedding": P(ROWS), "0/user_table/embedding": P(ROWS),
                  "1/tables/item_table/mu": P(ROWS), "1/tables/item_table/nu": P(ROWS),
                  "1/tables/user_table/mu": P(ROWS), "1/tables/user_table/nu": P(ROWS)},
}
GOLDEN_RANKER = {"0/item_table/embedding": P(ROWS), "0/user_table/embedding": P(ROWS)}


@pytest.mark.parametrize("shape", [(2, 4), (4, 2)])
@pytest.mark.parametrize("embedding_optimizer", sorted(GOLDEN_TWO_TOWER))
def test_golden_partition_specs_two_tower(shape, embedding_optimizer):
    tc = TrainConfig(optimizer="adam", embedding_optimizer=embedding_optimizer)
    _, abstract = state_lib.abstract(_two_tower, state_lib.make_optimizer(tc), 0, _mesh(*shape))
    specs = _specs(abstract)
    golden = GOLDEN_TWO_TOWER[embedding_optimizer]
    assert {k: v for k, v in specs.items() if v != P()} == golden
    assert specs["0/query_mlp/hidden/0/kernel"] == P()  # dense layers are replicated
    if embedding_optimizer != "dense":  # optax keeps no moments for the tables
        assert not [k for k in specs if "opt_state" in k and "table" in k]


@pytest.mark.parametrize("shape", [(2, 4), (4, 2)])
@pytest.mark.parametrize("use_ids", [False, True])
def test_golden_partition_specs_ranker(shape, use_ids):
    cfg = RankerConfig(embed_dim=8, hidden_dims=(16,), use_ids=use_ids)
    _, abstract = state_lib.abstract(lambda rngs: Ranker(cfg, VOCAB, 6, rngs, vector_dim=8,
                                                         temperature=0.05),
                                     state_lib.make_optimizer(TrainConfig()), 0, _mesh(*shape))
    specs = {k: v for k, v in _specs(abstract).items() if k.startswith("0/")}
    assert {k: v for k, v in specs.items() if v != P()} == (GOLDEN_RANKER if use_ids else {})
    assert specs["0/genre_proj/kernel"] == P()


BIG = Vocabularies(num_users=32768, num_items=32768, num_genres=3)  # 2 MiB tables
SHARD = 32768 * MODEL.embed_dim // 8  # elements of one device's shard of one table


@pytest.fixture(scope="module")
def lazy_adam_state():
    """(mesh, graphdef, state, shardings, TrainConfig): real arrays on a (4,2) mesh."""
    tc = TrainConfig(optimizer="adam", embedding_optimizer="lazy_adam")
    mesh = _mesh(4, 2)
    return (mesh, *state_lib.create(lambda rngs: TwoTower(MODEL, BIG, rngs),
                                    state_lib.make_optimizer(tc), 0, mesh), tc)


def test_tables_and_their_optimizer_state_hold_one_eighth_per_device(lazy_adam_state):
    _, _, state, _, _ = lazy_adam_state
    table_like = {k: x for k, x in _leaves(state).items() if "table" in k}
    assert len(table_like) == 6  # 2 tables, and mu and nu of each
    for key, x in table_like.items():
        assert x.addressable_shards[0].data.shape == (x.shape[0] // 8, *x.shape[1:]), key
        assert len({s.data.shape for s in x.addressable_shards}) == 1, key
    for name in ("dense", "rowwise_adagrad"):  # the other layouts, from shapes alone
        tc = TrainConfig(optimizer="adam", embedding_optimizer=name)
        _, abstract = state_lib.abstract(lambda rngs: TwoTower(MODEL, BIG, rngs),
                                         state_lib.make_optimizer(tc), 0, _mesh(4, 2))
        table_like = {k: x for k, x in _leaves(abstract).items() if "table" in k}
        assert len(table_like) == (6 if name == "dense" else 4)
        for key, x in table_like.items():
            assert x.sharding.shard_shape(x.shape) == (x.shape[0] // 8, *x.shape[1:]), key


def _leaves(state) -> dict:
    return {jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/value"): x
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


_SHAPE = re.compile(r"\b(?:pred|[fsu](?:8|16|32|64)|bf16)\[([0-9,]*)\]")
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_IN_PLACE = ("parameter", "scatter", "tuple", "get-tuple-element", "bitcast")


def _instructions(hlo: str):
    """(name, opcode, largest array size in elements, operand names, metadata op_name) per HLO
    instruction; a parameter's op_name is its path in the state, e.g. state[0]['item_table']..."""
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (.*?)\s*([a-z][a-z0-9-]*)\((.*)", line)
        if not m:
            continue
        name, result_type, opcode, rest = m.groups()
        sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in
                 _SHAPE.findall(result_type)] or [0]
        op_name = re.search(r'op_name="([^"]*)"', rest)
        yield (name, opcode, max(sizes), re.findall(r"%([\w.\-]+)", rest.split("), ")[0]),
               op_name.group(1) if op_name else "")


def _table_operands(hlo: str) -> list:
    """Collectives that take a table or its optimizer state (a step parameter) as operand."""
    instructions = list(_instructions(hlo))
    tables = {n for n, op, _, _, path in instructions if op == "parameter" and "table" in path}
    assert tables, "expected table parameters in the compiled step"
    return [(n, op) for n, op, _, operands, _ in instructions
            if op.startswith(_COLLECTIVES) and tables & set(operands)]


def _check_no_table_moves(hlo: str, shard: int, sparse: bool):
    """No collective has an operand or result of one table shard's size or more, nor takes a
    table (or its optimizer state) as operand; no array is larger than a table shard. With
    sparse updates the only shard-sized arrays are the table and its state themselves, updated
    in place by scatters (the dense path also has a shard-sized gradient, sharded like them)."""
    assert not _table_operands(hlo)
    instructions = list(_instructions(hlo))
    size_of = {name: size for name, _, size, _, _ in instructions}
    collectives = [(n, op, size, ops) for n, op, size, ops, _ in instructions
                   if op.startswith(_COLLECTIVES)]
    assert collectives, "expected the global-batch all-gathers in the compiled step"
    for name, op, size, operands in collectives:
        assert max([size, *[size_of.get(o, 0) for o in operands]]) < shard, (name, op, size)
    assert max(size for _, _, size, _, _ in instructions) <= shard
    if sparse:
        shard_sized = {(op, n) for n, op, size, _, _ in instructions if size == shard
                       and not op.startswith(_IN_PLACE) and "scatter" not in n}
        assert not shard_sized


def _compiled_step(tc, vocab, mesh, batch) -> str:
    graphdef, abstract = state_lib.abstract(lambda rngs: TwoTower(MODEL, vocab, rngs),
                                            state_lib.make_optimizer(tc), 0, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    train_step = steps.make_train_step(graphdef, steps.retrieval_loss, tc, shardings, mesh)
    with jax.set_mesh(mesh):
        return train_step.lower(abstract, sharding.shard_batch(batch, mesh)).compile().as_text()


@pytest.mark.parametrize("shape", [(4, 2), (8, 1)])
@pytest.mark.parametrize("embedding_optimizer", ["dense", "rowwise_adagrad"])
def test_compiled_step_never_holds_or_moves_a_whole_table(shape, embedding_optimizer):
    tc = TrainConfig(optimizer="adam", embedding_optimizer=embedding_optimizer)
    hlo = _compiled_step(tc, BIG, _mesh(*shape), _batch(np.random.default_rng(0)))
    _check_no_table_moves(hlo, SHARD, sparse=embedding_optimizer != "dense")


def test_sparse_step_never_gathers_a_table_smaller_than_its_lookups():
    """GSPMD all-gathers a table that is small next to the ids it looks up, as the dense step
    shows here (1024-row tables, 1792 lookups); the sparse step reads rows on each shard."""
    small = Vocabularies(num_users=1000, num_items=1000, num_genres=3)
    batch = _batch(np.random.default_rng(0), b=256, length=6)
    batch["item"] %= 1000
    batch["history"] %= 1000
    mesh = _mesh(8, 1)
    sparse_hlo = _compiled_step(TrainConfig(embedding_optimizer="lazy_adam"), small, mesh, batch)
    assert not _table_operands(sparse_hlo)
    dense_hlo = _compiled_step(TrainConfig(embedding_optimizer="dense"), small, mesh, batch)
    assert _table_operands(dense_hlo), "GSPMD no longer gathers small tables: update this note"


def test_donated_state_is_deleted_after_a_step(lazy_adam_state):
    mesh, graphdef, state, shardings, tc = lazy_adam_state
    train_step = steps.make_train_step(graphdef, steps.retrieval_loss, tc, shardings, mesh)
    with jax.set_mesh(mesh):
        new_state, _ = train_step(state, sharding.shard_batch(_batch(np.random.default_rng(0)), mesh))
    assert all(x.is_deleted() for x in jax.tree.leaves(state))
    assert not any(x.is_deleted() for x in jax.tree.leaves(new_state))


def _train(graphdef, state, shardings, shape, tc, batches):
    """Losses per step and parameters after them (numpy), with `state` placed on a mesh."""
    mesh = _mesh(*shape)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s.spec), shardings)
    state = jax.device_put(jax.tree.map(lambda x: x.copy(), state), shardings)  # donated below
    train_step = steps.make_train_step(graphdef, steps.retrieval_loss, tc, shardings, mesh)
    losses = []
    with jax.set_mesh(mesh):
        for batch in batches:
            state, loss = train_step(state, sharding.shard_batch(batch, mesh))
            losses.append(float(loss))
    return np.array(losses), _params(state)


def _params(state) -> dict:
    return {k: np.asarray(x) for k, x in _leaves(state[0]).items()
            if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)}


@pytest.mark.parametrize("optimizer,embedding_optimizer,lr",
                         [("sgd", "dense", 0.5), ("adagrad", "rowwise_adagrad", 0.1)])
def test_global_batch_negatives_match_single_device(optimizer, embedding_optimizer, lr):
    """Losses and every parameter after 3 steps on (4,2) and (8,1) meshes equal 1 device's.

    Each device holds 8 of the 64 examples, so 7/8 of every row's negatives live on other
    devices: the equality holds only if the softmax runs over the global batch and gradients
    flow back through the gathered remote item vectors to the rows and towers that made them.
    (sgd/adagrad: Adam amplifies summation-order noise to ~1e-4, see the jax-stack notes.)
    """
    tc = TrainConfig(optimizer=optimizer, learning_rate=lr, embedding_optimizer=embedding_optimizer)
    rng = np.random.default_rng(1)
    batches = [_batch(rng) for _ in range(3)]
    graphdef, state, shardings = state_lib.create(_two_tower, state_lib.make_optimizer(tc), 0,
                                                  _mesh(1, 1))
    init = _params(state)
    results = {shape: _train(graphdef, state, shardings, shape, tc, batches)
               for shape in [(1, 1), (4, 2), (8, 1)]}
    ref_losses, ref = results[(1, 1)]
    assert ref_losses[-1] < ref_losses[0]
    assert np.abs(ref["item_table/embedding"] - init["item_table/embedding"]).max() > 1e-2
    for shape in [(4, 2), (8, 1)]:
        losses, params = results[shape]
        np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
        for key, value in ref.items():
            np.testing.assert_allclose(params[key], value, atol=1e-5, rtol=0, err_msg=key)
