"""Training state: (model, optimizer, logQ estimate), built sharded on the mesh, split into a
graphdef and a pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import optax
from flax import nnx

from recsys import sharding
from recsys.config import TrainConfig
from recsys.models import layers
from recsys.models.logq import StreamingLogQ
from recsys.train import negatives, sparse


@dataclasses.dataclass(frozen=True)
class Optimizers:
    """How each part of the state is trained; `create` builds the state from this."""

    dense: optax.GradientTransformation  # parameters not covered by `rows` (all, when it is None)
    rows: sparse.RowwiseAdagrad | sparse.LazyAdam | None = None  # sparse updates of Table rows
    # The streaming estimate of the positives' log q, counted from the batches' items (not a
    # gradient update): kept beside the model and optimizer as negatives.LogQEstimate.
    logq: StreamingLogQ | None = None


def embedding_rule(cfg: TrainConfig, table_rows: int = 0, lookups_per_step: int = 0) -> str:
    """The table update train.embedding_optimizer asks for, with "auto" resolved.

    auto: a sparse row update pays for the rows a step looks up (a sort, a gather and a scatter
    of them), a dense optax update for every row of the table; so sparse when the table has
    more rows than one step looks up (lazy_adam after adam, rowwise_adagrad otherwise; sgd
    stays dense, its update of an untouched row is zero anyway), dense otherwise or when the
    sizes are not given. benchmarks/throughput.py measures the crossover.
    """
    rule = cfg.embedding_optimizer
    if rule != "auto":
        return rule
    if cfg.optimizer == "sgd" or not 0 < lookups_per_step < table_rows:
        return "dense"
    return "lazy_adam" if cfg.optimizer == "adam" else "rowwise_adagrad"


def make_optimizer(cfg: TrainConfig, learning_rate: float | None = None, *,
                   logq_rows: int = 0, lookups_per_step: int = 0) -> Optimizers:
    """The optimizers a TrainConfig asks for (its fields' ranges are checked by TrainConfig).

    Args:
      learning_rate: of the dense layers (default cfg.learning_rate).
      logq_rows: item vocabulary rows, when this model is trained with the retrieval loss and
        cfg.logq_estimate == "streaming" (0 = no streaming estimate, e.g. for the ranker).
      lookups_per_step: item-table lookups of one global step, with logq_rows the sizes that
        embedding_optimizer="auto" decides by (`embedding_rule`; none given: dense).
    """
    lr = cfg.learning_rate if learning_rate is None else learning_rate
    if cfg.optimizer == "adam":
        dense = optax.adamw(lr, weight_decay=cfg.weight_decay) if cfg.weight_decay > 0 else optax.adam(lr)
    elif cfg.optimizer == "adagrad":
        dense = optax.adagrad(lr)
    else:
        dense = optax.sgd(lr)
    rows = None
    rule = embedding_rule(cfg, logq_rows, lookups_per_step)
    if rule != "dense":
        rows = sparse.ROW_OPTIMIZERS[rule](cfg.embedding_learning_rate or lr)
    logq = None
    if cfg.logq_correction and cfg.logq_estimate == "streaming" and logq_rows > 0:
        buckets = layers.padded_rows(cfg.logq_buckets or logq_rows)
        logq = StreamingLogQ(buckets, cfg.logq_learning_rate)
    return Optimizers(dense, rows, logq)


class Optimizer(nnx.Optimizer):
    """nnx.Optimizer (optax) for dense parameters, plus the row optimizer state of tables.

    Attributes beyond nnx.Optimizer's `step` and `opt_state`:
      tables: {table path: {name: sparse.RowState [V, ...]}} when tables are updated sparsely,
        else None.
    """

    def __init__(self, model: nnx.Module, spec: Optimizers):
        tables = sparse.tables_of(model) if spec.rows is not None else {}
        super().__init__(model, spec.dense, wrt=sparse.DENSE_PARAMS if tables else nnx.Param)
        self.row_rule = spec.rows if tables else None
        self.tables = nnx.data({p: sparse.row_state(spec.rows.init(t.embedding[...]))
                                for p, t in tables.items()}) if tables else None


def _init_fn(build_model, optimizers, seed: int):
    if not isinstance(optimizers, Optimizers):
        optimizers = Optimizers(optimizers)

    def init():
        model = build_model(nnx.Rngs(seed))
        logq = negatives.LogQEstimate(optimizers.logq) if optimizers.logq is not None else None
        return model, Optimizer(model, optimizers), logq

    return init


def create(build_model: Callable[[nnx.Rngs], nnx.Module],
           optimizers: Optimizers | optax.GradientTransformation, seed: int,
           mesh: jax.sharding.Mesh):
    """Builds (model, optimizer, logq) inside jit so every table is born sharded by the rules table.

    `logq` is the streaming logQ estimate (negatives.LogQEstimate), or None when `optimizers`
    asks for none; None adds nothing to the state, which then holds keys 0 and 1 only.

    Args:
      optimizers: from `make_optimizer`; a bare optax transformation trains every parameter.

    Returns:
      graphdef: the static structure, for `nnx.merge`.
      state: the arrays (params, optimizer moments, logQ statistics, RNG streams), sharded on
        `mesh`.
      shardings: NamedShardings matching `state`.
    """
    init = _init_fn(build_model, optimizers, seed)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        graphdef, abstract = nnx.split(nnx.eval_shape(init))
        shardings = nnx.get_named_sharding(abstract, mesh)
        state = jax.jit(lambda: nnx.split(init())[1], out_shardings=shardings)()
    return graphdef, state, shardings


def abstract(build_model: Callable[[nnx.Rngs], nnx.Module],
             optimizers: Optimizers | optax.GradientTransformation, seed: int, mesh):
    """(graphdef, ShapeDtypeStructs with shardings) of the state `create` builds; allocates nothing.

    `mesh` may be an abstract mesh (jax.sharding.AbstractMesh), e.g. to plan for other hardware.
    """
    init = _init_fn(build_model, optimizers, seed)
    abstract_mesh = getattr(mesh, "abstract_mesh", mesh)
    with jax.sharding.use_abstract_mesh(abstract_mesh), nnx.logical_axis_rules(sharding.RULES):
        graphdef, shapes = nnx.split(nnx.eval_shape(init))
        shardings = nnx.get_named_sharding(shapes, mesh)
    return graphdef, abstract_state(shapes, shardings)


def abstract_state(state, shardings):
    """ShapeDtypeStructs with shardings: the target a checkpoint restores into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
