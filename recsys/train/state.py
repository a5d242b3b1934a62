"""Model-plus-optimizer state: built sharded on the mesh, split into a graphdef and a pytree."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from flax import nnx

from recsys import sharding
from recsys.config import TrainConfig


def make_optimizer(cfg: TrainConfig, learning_rate: float | None = None) -> optax.GradientTransformation:
    lr = cfg.learning_rate if learning_rate is None else learning_rate
    if cfg.optimizer == "adam":
        if cfg.weight_decay > 0:
            return optax.adamw(lr, weight_decay=cfg.weight_decay)
        return optax.adam(lr)
    if cfg.optimizer == "adagrad":
        return optax.adagrad(lr)
    return optax.sgd(lr)


def create(build_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
           seed: int, mesh: jax.sharding.Mesh):
    """Builds (model, optimizer) inside jit so every table is born sharded by the rules table.

    Returns:
      graphdef: the static structure, for `nnx.merge`.
      state: the arrays (params, optimizer moments, RNG streams), sharded on `mesh`.
      shardings: NamedShardings matching `state`.
    """
    def init():
        model = build_model(nnx.Rngs(seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        graphdef, abstract = nnx.split(nnx.eval_shape(init))
        shardings = nnx.get_named_sharding(abstract, mesh)
        state = jax.jit(lambda: nnx.split(init())[1], out_shardings=shardings)()
    return graphdef, state, shardings


def abstract_state(state, shardings):
    """ShapeDtypeStructs with shardings: the target a checkpoint restores into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
