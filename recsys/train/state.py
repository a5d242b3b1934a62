"""Model-plus-optimizer state: built sharded on the mesh, split into a graphdef and a pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import optax
from flax import nnx

from recsys import sharding
from recsys.config import ConfigError, TrainConfig
from recsys.models import layers
from recsys.models.logq import StreamingLogQ
from recsys.train import sparse


class RowState(nnx.Variable):
    """Per-row training state (table optimizer moments, logQ statistics), sharded like table rows."""


@dataclasses.dataclass(frozen=True)
class Optimizers:
    """How each part of the state is trained; `create` builds the optimizer from this."""

    dense: optax.GradientTransformation  # parameters not covered by `rows` (all, when it is None)
    rows: sparse.RowwiseAdagrad | sparse.LazyAdam | None = None  # sparse updates of Table rows
    logq: StreamingLogQ | None = None  # streaming estimate that replaces batch["log_q"]


def make_optimizer(cfg: TrainConfig, learning_rate: float | None = None, *,
                   logq_rows: int = 0) -> Optimizers:
    """The optimizers a TrainConfig asks for.

    Args:
      learning_rate: of the dense layers (default cfg.learning_rate).
      logq_rows: item vocabulary rows, when this model is trained with the retrieval loss and
        cfg.logq_estimate == "streaming" (0 = no streaming estimate, e.g. for the ranker).
    """
    lr = cfg.learning_rate if learning_rate is None else learning_rate
    if cfg.optimizer == "adam":
        dense = optax.adamw(lr, weight_decay=cfg.weight_decay) if cfg.weight_decay > 0 else optax.adam(lr)
    elif cfg.optimizer == "adagrad":
        dense = optax.adagrad(lr)
    else:
        dense = optax.sgd(lr)
    rows = None
    if cfg.embedding_optimizer != "dense":
        if cfg.embedding_learning_rate < 0:
            raise ConfigError(f"train.embedding_learning_rate={cfg.embedding_learning_rate} "
                              "must be >= 0 (0 = train.learning_rate)")
        rows = sparse.ROW_OPTIMIZERS[cfg.embedding_optimizer](cfg.embedding_learning_rate or lr)
    logq = None
    if cfg.logq_correction and cfg.logq_estimate == "streaming" and logq_rows > 0:
        if not 0 < cfg.logq_learning_rate <= 1 or cfg.logq_buckets < 0:
            raise ConfigError(f"train.logq_learning_rate={cfg.logq_learning_rate} must be in "
                              f"(0, 1] and train.logq_buckets={cfg.logq_buckets} >= 0")
        buckets = layers.padded_rows(cfg.logq_buckets or logq_rows)
        logq = StreamingLogQ(buckets, cfg.logq_learning_rate)
    return Optimizers(dense, rows, logq)


class Optimizer(nnx.Optimizer):
    """nnx.Optimizer (optax) for dense parameters, plus row optimizer state and the logQ estimate.

    Attributes beyond nnx.Optimizer's `step` and `opt_state`:
      tables: {table path: {name: RowState [V, ...]}} when tables are updated sparsely, else None.
      logq: {"last_seen", "gap", "sightings": RowState [H]} with the streaming logQ estimate,
        else None.
    """

    def __init__(self, model: nnx.Module, spec: Optimizers):
        tables = sparse.tables_of(model) if spec.rows is not None else {}
        super().__init__(model, spec.dense, wrt=sparse.DENSE_PARAMS if tables else nnx.Param)
        self.row_rule = spec.rows if tables else None
        self.tables = nnx.data({p: _row_state(spec.rows.init(t.embedding[...]))
                                for p, t in tables.items()}) if tables else None
        self.logq_rule = spec.logq
        self.logq = nnx.data(_row_state(spec.logq.init())) if spec.logq else None


def _row_state(arrays: dict) -> dict:
    return {k: RowState(v, out_sharding=("vocab",) + ("embed",) * (v.ndim - 1))
            for k, v in arrays.items()}


def _init_fn(build_model, optimizers, seed: int):
    if not isinstance(optimizers, Optimizers):
        optimizers = Optimizers(optimizers)

    def init():
        model = build_model(nnx.Rngs(seed))
        return model, Optimizer(model, optimizers)

    return init


def create(build_model: Callable[[nnx.Rngs], nnx.Module],
           optimizers: Optimizers | optax.GradientTransformation, seed: int,
           mesh: jax.sharding.Mesh):
    """Builds (model, optimizer) inside jit so every table is born sharded by the rules table.

    Args:
      optimizers: from `make_optimizer`; a bare optax transformation trains every parameter.

    Returns:
      graphdef: the static structure, for `nnx.merge`.
      state: the arrays (params, optimizer moments, RNG streams), sharded on `mesh`.
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
