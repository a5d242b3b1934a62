"""Sparse embedding updates: gradients w.r.t. the rows a batch looked up, and row optimizers for them.

A dense optax update reads and writes every row of a table every step (and the gradient w.r.t. a
[V, E] table is itself a [V, E] scatter-add), so step time grows with V. Here the step instead
  1. records the ids each table looks up in one traced forward pass (XLA drops the rest of it),
  2. gathers the unique rows, padded to a static count U = the number of ids looked up,
  3. differentiates the loss w.r.t. those [U, E] rows (the tables' lookups read from them),
  4. updates the rows and their optimizer state (row-wise Adagrad or lazy Adam) and scatters
     them back into the row-sharded table and state with `.at[rows].set`.
Nothing of size V is computed, moved or allocated except the donated table and its state, and
rows outside the batch, and their optimizer state, stay bit-identical. The work grows with the
lookups per step instead: for a table with fewer rows than that, dense optax is as fast.
On a mesh the gathered rows go to every device (as the embeddings of a dense lookup do), and
their gradients, the update and the optimizer-state rows are split over devices like table rows.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from recsys import sharding
from recsys.models import layers

# Parameters that optax updates when tables are updated sparsely: everything but table rows.
DENSE_PARAMS = nnx.All(nnx.Param, nnx.Not(layers.TableRows))


class RowState(nnx.Variable):
    """Per-row training state outside the model (table optimizer moments, the logQ estimate),
    sharded like table rows."""


def row_state(arrays: dict) -> dict:
    """{name: RowState} over `arrays` [V, ...], each split over devices along its rows."""
    return {k: RowState(v, out_sharding=("vocab",) + ("embed",) * (v.ndim - 1))
            for k, v in arrays.items()}


@dataclasses.dataclass(frozen=True)
class RowwiseAdagrad:
    """Adagrad with one accumulator per row (TorchRec's and TF's sparse Adagrad).

    acc_r += mean_e(g_re^2); row_r -= lr * g_r / sqrt(acc_r + eps). With E = 1 this is
    optax.adagrad (same initial accumulator and eps).
    """

    learning_rate: float
    initial_accumulator: float = 0.1
    eps: float = 1e-7

    def init(self, rows_VxE) -> dict:
        return {"accumulator": jnp.full(rows_VxE.shape[:1], self.initial_accumulator,
                                          rows_VxE.dtype)}

    def update(self, rows_UxE, grads_UxE, state: dict, step):
        del step  # Adagrad needs no step count
        acc_U = state["accumulator"] + jnp.mean(grads_UxE * grads_UxE, axis=-1)
        scale_U = jax.lax.rsqrt(acc_U + self.eps)
        return rows_UxE - self.learning_rate * grads_UxE * scale_U[:, None], {"accumulator": acc_U}


@dataclasses.dataclass(frozen=True)
class LazyAdam:
    """Adam whose moments move only for the rows a batch touched (TF's LazyAdam).

    Bias correction uses the global step, as TF does; when every row is touched every step this
    is optax.adam exactly.
    """

    learning_rate: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def init(self, rows_VxE) -> dict:
        return {"mu": jnp.zeros_like(rows_VxE), "nu": jnp.zeros_like(rows_VxE)}

    def update(self, rows_UxE, grads_UxE, state: dict, step):
        t = jnp.asarray(step, jnp.float32)
        mu = self.b1 * state["mu"] + (1 - self.b1) * grads_UxE
        nu = self.b2 * state["nu"] + (1 - self.b2) * grads_UxE * grads_UxE
        mu_hat, nu_hat = mu / (1 - self.b1 ** t), nu / (1 - self.b2 ** t)
        new_rows = rows_UxE - self.learning_rate * mu_hat / (jnp.sqrt(nu_hat) + self.eps)
        return new_rows, {"mu": mu, "nu": nu}


ROW_OPTIMIZERS = {"rowwise_adagrad": RowwiseAdagrad, "lazy_adam": LazyAdam}


def tables_of(model: nnx.Module) -> dict[str, layers.Table]:
    """Every row-sharded table of a model by its path, e.g. {"item_table": Table}."""
    return {"/".join(map(str, path)): m for path, m in nnx.iter_modules(model)
            if isinstance(m, layers.Table)}


def unique_rows(ids_N, num_rows: int):
    """Sorted unique ids, padded to N entries with `num_rows` (out of range: reads 0, writes drop)."""
    return layers.unique_ids(ids_N, num_rows)[0]


def _row_axes():
    return dict(sharding.RULES)["vocab"]


def _like_rows(x):
    """Splits a [U, ...] array over devices like table rows (else all of it is on every device)."""
    spec = jax.sharding.PartitionSpec(_row_axes())
    return jax.lax.with_sharding_constraint(x, spec) if _has_mesh() else x


def _has_mesh() -> bool:
    return not jax.sharding.get_abstract_mesh().empty


def gather_rows(table_Vx, ids_U):
    """table[ids] [U, ...] from a row-sharded table, for ids on every device (0 out of range).

    shard_map, because for a table that is small next to the ids GSPMD all-gathers the whole
    table to every device; here each device reads only the rows it holds and the partial
    results are summed (what GSPMD itself does for large tables).
    """
    if not _has_mesh():
        return table_Vx.at[ids_U].get(mode="fill", fill_value=0)
    axes = _row_axes()

    def local(shard_vx, ids_U):
        local_U = ids_U - jax.lax.axis_index(axes) * shard_vx.shape[0]
        rows_Ux = shard_vx.at[local_U].get(mode="fill", fill_value=0)
        held_U = (local_U >= 0) & (local_U < shard_vx.shape[0])
        return jax.lax.psum(jnp.where(held_U.reshape(-1, *[1] * (rows_Ux.ndim - 1)), rows_Ux, 0),
                            axes)

    P = jax.sharding.PartitionSpec
    return jax.shard_map(local, in_specs=(P(axes), P()), out_specs=P())(table_Vx, ids_U)


def lookup_ids(model: nnx.Module, loss_of) -> dict:
    """{table path: every id it looks up in loss_of(model), flattened [N]}.

    Runs the forward pass on a copy (so RNG streams do not advance twice) with lookups that
    return zeros: only the ids are kept, and XLA removes the rest of this pass. So the ids a
    table looks up must not depend on table values (inputs and hashing of inputs are fine).
    """
    copy = nnx.clone(model)
    paths = {id(t): p for p, t in tables_of(copy).items()}
    seen: dict[str, list] = {}

    def record(table, ids):
        seen.setdefault(paths[id(table)], []).append(jnp.reshape(ids, (-1,)))
        return jnp.zeros((*ids.shape, table.embedding.shape[1]), table.embedding.dtype)

    with layers.override_lookups(record):
        loss_of(copy)
    return {p: jnp.concatenate(v) for p, v in seen.items()}


class RowGrads(NamedTuple):
    """What a step read from one table: unique ids [U], their rows [U, E], the loss gradient [U, E]."""

    ids_U: jax.Array
    rows_UxE: jax.Array
    grads_UxE: jax.Array


def value_and_grads(model: nnx.Module, loss_of, dense_filter=DENSE_PARAMS):
    """Loss, gradients of the dense parameters (nnx.State) and {table path: RowGrads}.

    Args:
      loss_of: model -> scalar loss; every table lookup inside it reads the gathered rows.
      dense_filter: the parameters differentiated as usual (never table rows).
    """
    tables = tables_of(model)
    ids_U = {p: unique_rows(ids, tables[p].embedding.shape[0])
             for p, ids in lookup_ids(model, loss_of).items()}
    rows = {p: gather_rows(tables[p].embedding[...], u) for p, u in ids_U.items()}

    def loss_on_rows(model, rows):
        paths = {id(t): p for p, t in tables_of(model).items()}

        def read_rows(table, ids):  # ids are among the sorted unique ids: find their slots
            p = paths[id(table)]
            return jnp.take(rows[p], jnp.searchsorted(ids_U[p], ids), axis=0)

        with layers.override_lookups(read_rows):
            return loss_of(model)

    grad_fn = nnx.value_and_grad(loss_on_rows, argnums=(nnx.DiffState(0, dense_filter), 1))
    loss, (dense_grads, row_grads) = grad_fn(model, rows)
    return loss, dense_grads, {p: RowGrads(ids_U[p], _like_rows(rows[p]), _like_rows(row_grads[p]))
                               for p in ids_U}


def apply_row_updates(model: nnx.Module, table_states: dict, grads: dict, rule, step) -> None:
    """Updates the looked-up rows of each table and of its optimizer state, in place.

    Args:
      table_states: {table path: {name: nnx.Variable [V, ...]}}, sharded like the table rows.
      grads: {table path: RowGrads} from `value_and_grads`.
      step: the 1-based number of this step (lazy Adam's bias correction).
    """
    tables = tables_of(model)
    for path, g in grads.items():
        state = table_states[path]
        old = {k: _like_rows(gather_rows(v[...], g.ids_U)) for k, v in state.items()}
        new_rows, new_state = rule.update(g.rows_UxE, g.grads_UxE, old, step)
        embedding = tables[path].embedding
        embedding[...] = embedding[...].at[g.ids_U].set(new_rows, mode="drop")
        for k, v in state.items():
            v[...] = v[...].at[g.ids_U].set(new_state[k], mode="drop")
