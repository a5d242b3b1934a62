"""Order-aware history encoder: single-head attention over the last L items with learned positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from recsys.models import layers


class AttentionPooling(nnx.Module):
    """Pools [B, L, E] history embeddings (left-padded, most recent last) into [B, E].

    Every slot gets a learned embedding of its distance from the most recent item, so the model
    can learn how fast older items matter less, and which items matter given the others. The
    attention query is a learned vector plus a projection of the most recent item (no target
    item is needed, so one query vector serves a search over the whole catalogue). Padding
    slots get no weight; an empty history pools to zeros.
    """

    def __init__(self, length: int, dim: int, dropout: float, rngs: nnx.Rngs):
        if length <= 0:
            raise ValueError(f"attention pooling needs the history length, got {length}")
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed"))
        self.positions = nnx.Param(init(rngs.params(), (length, dim)))
        self.query = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.q_proj = layers.dense(dim, dim, rngs)
        kernel = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "hidden"))
        self.key_kernel = nnx.Param(kernel(rngs.params(), (dim, dim)))
        self.v_proj = layers.dense(dim, dim, rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, emb_BxLxE, history_BxL):
        length, dim = emb_BxLxE.shape[1], emb_BxLxE.shape[2]
        positions_LxE = self.positions[...]
        if positions_LxE.shape[0] != length:
            raise ValueError(f"history has {length} slots; the model was built for "
                             f"{positions_LxE.shape[0]} (data.history_len)")
        x_BxLxE = self.dropout(emb_BxLxE + positions_LxE[None])
        valid_BxL = history_BxL > 0
        q_BxE = self.query[...][None, :] + self.q_proj(x_BxLxE[:, -1])
        # Keys and values are linear in x, so project the one query instead of the L keys
        # ((x K) . q = x . (K q)) and the pooled value instead of L values: O(B L E), not O(B L E^2).
        kq_BxE = q_BxE @ self.key_kernel[...].T
        scores_BxL = jnp.einsum("ble,be->bl", x_BxLxE, kq_BxE) / jnp.sqrt(dim)
        weights_BxL = jax.nn.softmax(jnp.where(valid_BxL, scores_BxL, -1e9), axis=-1)
        weights_BxL = weights_BxL * valid_BxL  # an empty history has no weight anywhere
        return self.v_proj(jnp.einsum("bl,ble->be", weights_BxL, x_BxLxE)) * valid_BxL.any(
            axis=1, keepdims=True)
