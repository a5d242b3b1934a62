"""The ranker: DCN-v2 (cross network + deep MLP) over ids, features, history attention and time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from recsys import features
from recsys.config import NUM_YEAR_BUCKETS, RankerConfig
from recsys.models import layers
from recsys.models.ranker_inputs import GAP_BUCKETS, NUM_NUMERIC
from recsys.models.two_tower import Vocabularies


class Constant(nnx.Variable):
    """A fixed array of the model (not trained): e.g. input standardisation statistics."""


class CrossLayer(nnx.Module):
    """x_{l+1} = x_0 * (W x_l + b) + x_l, with W full (rank 0) or low-rank U V (Wang et al. 2021).

    W's last factor starts at zero, so a new stack of cross layers passes x_0 through unchanged
    and the network starts from a linear model of its inputs, growing feature crosses as it
    learns (a safer start when training events are few).
    """

    def __init__(self, dim: int, rank: int, rngs: nnx.Rngs):
        if rank > 0:
            self.down = layers.dense(dim, rank, rngs)
            self.up = layers.dense(rank, dim, rngs)
        else:
            self.down, self.up = None, layers.dense(dim, dim, rngs)
        self.up.kernel[...] = jnp.zeros_like(self.up.kernel[...])

    def __call__(self, x0_BxI, x_BxI):
        h = x_BxI if self.down is None else self.down(x_BxI)
        return x0_BxI * self.up(h) + x_BxI


class HistoryAttention(nnx.Module):
    """DIN-style target attention of each candidate over the user's history items.

    Logits mix each history item's retrieval cosine with the candidate, a learned bias per
    history position (recency) and, with id embeddings, the candidate's own-embedding affinity;
    padding is masked. Returns the attended cosine [B, N] and attended embeddings [B, N, E].
    """

    def __init__(self, length: int, dim: int, rngs: nnx.Rngs):
        self.position_bias = nnx.Param(jnp.zeros((length,), jnp.float32))
        self.cos_weight = nnx.Param(jnp.asarray(5.0, jnp.float32))
        self.scale = dim ** -0.5

    def __call__(self, cos_BxNxL, mask_BxL, e_BxNxE=None, eh_BxLxE=None):
        logits = self.cos_weight[...] * cos_BxNxL + self.position_bias[...]
        if e_BxNxE is not None:
            logits = logits + jnp.einsum("bne,ble->bnl", e_BxNxE, eh_BxLxE) * self.scale
        logits = jnp.where(mask_BxL[:, None, :], logits, -1e9)
        w_BxNxL = jax.nn.softmax(logits, axis=-1) * mask_BxL[:, None, :]
        attended = None if e_BxNxE is None else jnp.einsum("bnl,ble->bne", w_BxNxL, eh_BxLxE)
        return jnp.sum(w_BxNxL * cos_BxNxL, -1), attended


class Ranker(nnx.Module):
    """Scores [B, N] candidates: learned scale x retrieval score + a DCN-v2 correction.

    The DCN input per candidate: the retrieval score and history similarities (cosine to the
    latest item, the closest, the attended one; genre affinity), item popularity in time
    windows and age at the request time, genre / year / year-gap / user-feature embeddings,
    the request context and, optionally, the ranker's own user and item id embeddings with the
    attended history embedding (cfg.use_ids) and the raw two-tower vectors
    (cfg.use_vectors). Inputs: recsys.models.ranker_inputs. The correction's output layer
    starts at zero, so an untrained ranker keeps the retrieval order.
    """

    def __init__(self, cfg: RankerConfig, vocab: Vocabularies, history_len: int, rngs: nnx.Rngs,
                 numeric_stats: tuple | None = None, *, vector_dim: int, temperature: float):
        """numeric_stats: (mean, std) [NUM_NUMERIC] of recsys.models.ranker_inputs.numeric.

        vector_dim: D of the two-tower vectors; temperature: theirs, the retrieval score's
        initial scale is 1 / temperature.
        """
        self.cfg = cfg
        e, d = cfg.embed_dim, vector_dim
        mean, std = numeric_stats or (jnp.zeros(NUM_NUMERIC), jnp.ones(NUM_NUMERIC))
        self.numeric_mean = Constant(jnp.asarray(mean, jnp.float32))
        self.numeric_std = Constant(jnp.asarray(std, jnp.float32))
        self.item_table = layers.table(vocab.num_items, e, rngs) if cfg.use_ids else None
        self.user_table = layers.table(vocab.num_users, e, rngs) if cfg.use_ids else None
        self.user_feature_tables = nnx.List(
            [layers.small_table(n, e, rngs) for n in vocab.user_cardinalities])
        self.genre_proj = layers.dense(vocab.num_genres, e, rngs)
        self.year_table = layers.small_table(NUM_YEAR_BUCKETS, e, rngs)
        self.gap_table = layers.small_table(GAP_BUCKETS, e, rngs)
        self.attention = HistoryAttention(history_len, e, rngs)
        num_embeds = 3 + int(bool(vocab.user_cardinalities)) + 4 * int(cfg.use_ids)
        in_dim = num_embeds * e + NUM_NUMERIC + 1 + (3 * d if cfg.use_vectors else 0)
        self.cross = nnx.List([CrossLayer(in_dim, cfg.cross_rank, rngs)
                               for _ in range(cfg.cross_layers)])
        self.deep = nnx.List([layers.dense(a, b, rngs) for a, b in
                              zip((in_dim, *cfg.hidden_dims), cfg.hidden_dims)])
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        top = cfg.hidden_dims[-1] if cfg.hidden_dims else in_dim
        if cfg.structure == "parallel":
            top += in_dim
        self.out = layers.dense(top, 1, rngs)
        self.out.kernel[...] = jnp.zeros_like(self.out.kernel[...])
        self.dot_scale = nnx.Param(jnp.asarray(1.0 / temperature, jnp.float32))

    def features(self, batch: dict):
        """x0 [B, N, I] (numeric features standardised) and the retrieval score [B, N]."""
        q_BxD, c_BxNxD, h_BxLxD = batch["q"], batch["c"], batch["h"]
        b, n = batch["item"].shape
        mask_BxL = batch["history"] > 0
        cos_BxNxL = jnp.einsum("bnd,bld->bnl", c_BxNxD, h_BxLxD) * mask_BxL[:, None, :]

        def per_request(x_BxK):
            return jnp.broadcast_to(x_BxK[:, None, :], (b, n, x_BxK.shape[-1]))

        numeric = features.ranker_numeric(batch, jnp)
        numeric = (numeric - self.numeric_mean[...]) / self.numeric_std[...]
        parts = [self.genre_proj(batch["item_genres"]), self.year_table(batch["item_year"]),
                 self.gap_table(batch["year_gap"])]
        if self.item_table is not None:
            e_item = self.item_table(batch["item"])
            attended_cos_BxN, attended_BxNxE = self.attention(
                cos_BxNxL, mask_BxL, e_item, self.item_table(batch["history"]))
            parts += [e_item, attended_BxNxE, attended_BxNxE * e_item,
                      per_request(self.user_table(batch["user"]))]
        else:
            attended_cos_BxN, _ = self.attention(cos_BxNxL, mask_BxL)
        parts += [numeric, attended_cos_BxN[..., None]]
        if len(self.user_feature_tables):
            feats_BxF = batch["user_feats"]
            parts.append(per_request(sum(t(feats_BxF[:, i])
                                         for i, t in enumerate(self.user_feature_tables))))
        if self.cfg.use_vectors:
            q_BxNxD = jnp.broadcast_to(q_BxD[:, None, :], c_BxNxD.shape)
            parts += [q_BxNxD, c_BxNxD, q_BxNxD * c_BxNxD]
        return jnp.concatenate(parts, axis=-1), batch["item_sims"][..., 0]

    def __call__(self, batch: dict):
        x0_BxNxI, score_BxN = self.features(batch)
        b, n, i = x0_BxNxI.shape
        x0 = x0_BxNxI.reshape(b * n, i)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        deep = x if self.cfg.structure == "stacked" else x0
        for layer in self.deep:
            deep = self.dropout(nnx.relu(layer(deep)))
        top = deep if self.cfg.structure == "stacked" else jnp.concatenate([x, deep], -1)
        correction_BxN = self.out(top).reshape(b, n)
        return self.dot_scale[...] * score_BxN + correction_BxN
