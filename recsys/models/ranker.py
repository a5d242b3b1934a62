"""The ranker: scores each retrieved candidate from both towers' vectors and side features."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from recsys.config import NUM_YEAR_BUCKETS, ModelConfig
from recsys.models import layers
from recsys.models.two_tower import Vocabularies

FEATURE_DIM = 16  # width of the ranker's own small feature embeddings


class Ranker(nnx.Module):
    """Retrieval score plus an MLP over [q, c, q*c, q·c, genres, year, popularity, user features].

    Inputs (dict): q [B, D], c [B, N, D] (two-tower vectors), item_genres [B, N, G],
    item_year [B, N], item_logpop [B, N], user_feats [B, F]. Output: scores [B, N].
    """

    def __init__(self, cfg: ModelConfig, vocab: Vocabularies, rngs: nnx.Rngs):
        d, f = cfg.out_dim, FEATURE_DIM
        self.genre_proj = layers.dense(vocab.num_genres, f, rngs)
        self.year_table = layers.small_table(NUM_YEAR_BUCKETS, f, rngs)
        self.user_feature_tables = nnx.List(
            [layers.small_table(n, f, rngs) for n in vocab.user_cardinalities])
        in_dim = 3 * d + 2 + 2 * f + f * int(bool(vocab.user_cardinalities))
        self.mlp = layers.MLP(in_dim, cfg.ranker_hidden_dims, 1, cfg.dropout, rngs)
        # Residual on the retrieval score: an untrained ranker keeps the retrieval order, and
        # training only has to learn the correction (zero-initialised output layer).
        self.mlp.out.kernel[...] = jnp.zeros_like(self.mlp.out.kernel[...])
        self.dot_scale = nnx.Param(jnp.asarray(1.0 / cfg.temperature, jnp.float32))

    def __call__(self, batch: dict):
        q_BxD, c_BxNxD = batch["q"], batch["c"]
        n = c_BxNxD.shape[1]
        q_BxNxD = jnp.broadcast_to(q_BxD[:, None, :], c_BxNxD.shape)
        dot_BxNx1 = jnp.sum(q_BxNxD * c_BxNxD, axis=-1, keepdims=True)
        parts = [q_BxNxD, c_BxNxD, q_BxNxD * c_BxNxD, dot_BxNx1,
                 batch["item_logpop"][..., None],
                 self.genre_proj(batch["item_genres"]), self.year_table(batch["item_year"])]
        if len(self.user_feature_tables):
            feats_BxF = batch["user_feats"]
            user_BxF = sum(t(feats_BxF[:, i]) for i, t in enumerate(self.user_feature_tables))
            parts.append(jnp.broadcast_to(user_BxF[:, None, :], (*c_BxNxD.shape[:2], user_BxF.shape[-1])))
        x_BxNxI = jnp.concatenate(parts, axis=-1)
        correction_BxN = self.mlp(x_BxNxI.reshape(-1, x_BxNxI.shape[-1])).reshape(-1, n)
        return self.dot_scale[...] * dot_BxNx1[..., 0] + correction_BxN
