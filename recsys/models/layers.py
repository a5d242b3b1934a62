"""Building blocks shared by the towers and the ranker: sharded tables, MLPs, history pooling."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools

import jax
import jax.numpy as jnp
from flax import nnx

# Table rows are padded to a multiple of this, so a table divides evenly over any mesh of up to
# ROW_MULTIPLE devices and a checkpoint restores onto another device count with the same shape.
ROW_MULTIPLE = 128


def padded_rows(num_rows: int) -> int:
    return -(-num_rows // ROW_MULTIPLE) * ROW_MULTIPLE


class TableRows(nnx.Param):
    """The rows of a row-sharded table; a sparse embedding optimizer updates only those looked up."""


# Set only by the sparse train step (recsys/train/sparse.py): fn(table, ids) replaces the lookup
# so that gradients flow to the gathered rows of a step instead of to the whole [V, E] table.
_LOOKUP_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("lookup_override", default=None)


@contextlib.contextmanager
def override_lookups(fn):
    """Within the block, every `Table(ids)` call returns `fn(table, ids)`."""
    token = _LOOKUP_OVERRIDE.set(fn)
    try:
        yield
    finally:
        _LOOKUP_OVERRIDE.reset(token)


class Table(nnx.Module):
    """A row-sharded embedding table ('vocab', 'embed'): `table(ids [...])` -> [..., E]."""

    def __init__(self, num_rows: int, dim: int, rngs: nnx.Rngs, scale: float = 0.05):
        value = nnx.initializers.normal(scale)(rngs.params(), (num_rows, dim))
        self.embedding = TableRows(value, out_sharding=("vocab", "embed"))

    def __call__(self, ids):
        override = _LOOKUP_OVERRIDE.get()
        if override is not None:
            return override(self, ids)
        return jnp.take(self.embedding[...], ids, axis=0)


def unique_ids(ids_N, fill_value: int):
    """Sorted unique ids padded to N entries with `fill_value`, and how often each occurs: [N], [N].

    jnp.unique(size=...) gives the same, but is ~5x slower on an input sharded over devices.
    """
    n = ids_N.shape[0]
    sorted_N = jnp.sort(ids_N)
    first_N = jnp.concatenate([jnp.ones((1,), bool), sorted_N[1:] != sorted_N[:-1]])
    slot_N = jnp.cumsum(first_N) - 1
    unique_N = jnp.full_like(ids_N, fill_value).at[jnp.where(first_N, slot_N, n)].set(
        sorted_N, mode="drop")
    return unique_N, jnp.zeros((n,), jnp.int32).at[slot_N].add(1)


# Set only by the train step (train.compute_dtype): the dtype of tower matmuls and logits.
# Parameters, optimizer state, normalisation and the softmax stay float32.
_COMPUTE_DTYPE: contextvars.ContextVar = contextvars.ContextVar("compute_dtype", default=None)


@contextlib.contextmanager
def compute_dtype(dtype):
    """Within the block, MLP layers and retrieval logits multiply in `dtype` (None: float32)."""
    token = _COMPUTE_DTYPE.set(None if dtype in (None, "float32", jnp.float32) else jnp.dtype(dtype))
    try:
        yield
    finally:
        _COMPUTE_DTYPE.reset(token)


def matmul_dtype():
    """The dtype `compute_dtype` set, or None (float32, the inputs' own dtype)."""
    return _COMPUTE_DTYPE.get()


def einsum(spec: str, a, b):
    """jnp.einsum(spec, a, b); with a compute dtype set the products are in that dtype and
    accumulate into float32."""
    dtype = matmul_dtype()
    if dtype is None:
        return jnp.einsum(spec, a, b)
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def linear(layer: nnx.Linear, x_BxI):
    """layer(x), with the matmul in the compute dtype when one is set (float32 parameters)."""
    dtype = matmul_dtype()
    if dtype is None:
        return layer(x_BxI)
    y_BxO = x_BxI.astype(dtype) @ layer.kernel[...].astype(dtype)
    return y_BxO + layer.bias[...].astype(dtype) if layer.bias is not None else y_BxO


def table(num_rows: int, dim: int, rngs: nnx.Rngs, scale: float = 0.05) -> Table:
    """A row-sharded embedding table ('vocab', 'embed') with padded rows."""
    return Table(padded_rows(num_rows), dim, rngs, scale)


def small_table(num_rows: int, dim: int, rngs: nnx.Rngs, scale: float = 0.05) -> nnx.Embed:
    """A replicated table for small vocabularies (features such as genre, year, occupation)."""
    init = nnx.with_partitioning(nnx.initializers.normal(scale), (None, "embed"))
    return nnx.Embed(max(num_rows, 1), dim, embedding_init=init, rngs=rngs)


def dense(in_dim: int, out_dim: int, rngs: nnx.Rngs) -> nnx.Linear:
    kernel_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "hidden"))
    return nnx.Linear(in_dim, out_dim, kernel_init=kernel_init, rngs=rngs)


class MLP(nnx.Module):
    """ReLU layers of the given widths, then a linear layer to `out_dim`."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float,
                 rngs: nnx.Rngs):
        dims = (in_dim, *hidden)
        self.hidden = nnx.List([dense(a, b, rngs) for a, b in itertools.pairwise(dims)])
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.out = dense(dims[-1], out_dim, rngs)

    def __call__(self, x_BxI):
        for layer in self.hidden:
            x_BxI = self.dropout(nnx.relu(linear(layer, x_BxI)))
        return linear(self.out, x_BxI)


def pool_history(emb_BxLxE, history_BxL, pooling: str, decay: float):
    """Pools history item embeddings (0 = padding, most recent last) into one vector per row.

    "mean" averages the real items; "recency" weights the item k steps back by decay**k.
    """
    emb, hist = tuple(jnp.shape(emb_BxLxE)), tuple(jnp.shape(history_BxL))
    if len(emb) != 3 or emb[:2] != hist:
        raise ValueError(f"history embeddings {emb} must be [B, L, E] for history {hist} [B, L]")
    mask_BxL = (history_BxL > 0).astype(emb_BxLxE.dtype)
    if pooling == "recency":
        length = history_BxL.shape[1]
        steps_back_L = jnp.arange(length - 1, -1, -1, dtype=emb_BxLxE.dtype)
        mask_BxL = mask_BxL * decay ** steps_back_L[None, :]
    total_Bx1 = jnp.maximum(mask_BxL.sum(axis=1, keepdims=True), 1e-6)
    return jnp.einsum("bl,ble->be", mask_BxL, emb_BxLxE) / total_Bx1


def jitted(method: str):
    """`fn(model, inputs)` calling model.<method>(inputs) under jax.jit on the split state.

    The project's one jit style (as the train steps): graphdef static, state and inputs traced.
    For models in eval mode; state changes made inside (RNG counters) are not written back.
    """
    @functools.partial(jax.jit, static_argnums=0)
    def call(graphdef, state, inputs):
        return getattr(nnx.merge(graphdef, state), method)(inputs)

    return lambda model, inputs: call(*nnx.split(model), inputs)
