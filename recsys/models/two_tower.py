"""The two-tower retrieval model: a query tower and a candidate tower sharing one item table."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from recsys.config import NUM_YEAR_BUCKETS, ConfigError, ModelConfig
from recsys.models import history, layers


@dataclasses.dataclass(frozen=True)
class Vocabularies:
    """Table sizes a model is built for (written to manifests and checked at restore)."""

    num_users: int  # user vocabulary rows, incl. the unknown row 0
    num_items: int  # item vocabulary rows, incl. the padding row 0
    num_genres: int  # width of the multi-hot genre vector
    user_cardinalities: tuple[int, ...] = ()  # vocabulary size of each user feature
    history_len: int = 0  # L: history slots the query tower reads (attention pooling needs it)


NUM_TIME_FEATURES = 2
_MINUTES_PER_YEAR = 365.25 * 24 * 60


def time_features(time_context_Bx2):
    """[B, 2] features from [B, 2] int32 minutes (request, previous event or -1): log(1 + hours
    since the user's previous event) (0 when there is none) and the era, (year - 2000) / 10."""
    now_B, prev_B = time_context_Bx2[:, 0], time_context_Bx2[:, 1]
    hours_B = jnp.maximum(now_B - prev_B, 0).astype(jnp.float32) / 60.0  # int difference: exact
    gap_B = jnp.where(prev_B >= 0, jnp.log1p(hours_B), 0.0)
    era_B = (now_B.astype(jnp.float32) / _MINUTES_PER_YEAR + 1970.0 - 2000.0) / 10.0
    return jnp.stack([gap_B, era_B], axis=1)


def input_names(cfg: ModelConfig, vocab: Vocabularies) -> tuple[str, ...]:
    """The batch keys `TwoTower(cfg, vocab)` reads: a batch need not carry (nor send to the
    device) the others."""
    names = (["history"] if cfg.reads_history else []) + ["item"]
    if cfg.use_user_id:
        names.append("user")
    if cfg.use_features:
        names += ["item_genres", "item_year"] + (["user_feats"] if vocab.user_cardinalities else [])
    if cfg.time_features:
        names.append("time_context")
    return tuple(names)


class TwoTower(nnx.Module):
    """Query tower (user id, pooled history, user features) and candidate tower (id, genres, year).

    Both end in L2-normalised D-dim vectors; the score of a pair is q·c / temperature. Each
    tower's embeddings go side by side through an MLP to D, or straight to the normalisation
    when model.output_layer is false (then they must be D wide: matrix factorisation's towers).
    """

    def __init__(self, cfg: ModelConfig, vocab: Vocabularies, rngs: nnx.Rngs):
        self.cfg = cfg
        e = cfg.embed_dim
        self.item_table = layers.table(vocab.num_items, e, rngs)
        self.user_table = layers.table(vocab.num_users, e, rngs) if cfg.use_user_id else None
        self.user_feature_tables = nnx.List(
            [layers.small_table(n, e, rngs) for n in vocab.user_cardinalities]
            if cfg.use_features else [])
        self.genre_proj = layers.dense(vocab.num_genres, e, rngs) if cfg.use_features else None
        self.history_attention = (history.AttentionPooling(vocab.history_len, e, cfg.dropout, rngs)
                                  if cfg.history_pooling == "attention" else None)
        self.year_table = layers.small_table(NUM_YEAR_BUCKETS, e, rngs) if cfg.use_features else None
        self.time_proj = layers.dense(NUM_TIME_FEATURES, e, rngs) if cfg.time_features else None
        query_in = e * (int(self.cfg.reads_history) + int(cfg.use_user_id)
                        + int(bool(self.user_feature_tables)) + int(cfg.time_features))
        item_in = e * (1 + 2 * int(cfg.use_features))
        if query_in == 0:
            raise ConfigError("the query tower has no input: model.history_pooling=none, no user "
                              "id and no user features in the data; set model.use_user_id=true")
        if cfg.output_layer:
            self.query_mlp = layers.MLP(query_in, cfg.hidden_dims, cfg.out_dim, cfg.dropout, rngs)
            self.item_mlp = layers.MLP(item_in, cfg.hidden_dims, cfg.out_dim, cfg.dropout, rngs)
        else:
            if query_in != cfg.out_dim:
                raise ConfigError(f"model.output_layer=false makes the query vector its "
                                  f"embeddings side by side, {query_in} wide with these inputs: "
                                  f"model.out_dim={cfg.out_dim} must equal that")
            self.query_mlp = self.item_mlp = None
        self.log_temperature = nnx.Param(jnp.asarray(np.log(cfg.temperature), jnp.float32))

    def temperature(self):
        t = self.log_temperature[...]
        if not self.cfg.learn_temperature:
            t = jnp.asarray(np.log(self.cfg.temperature), jnp.float32)
        return jnp.exp(t)

    def embed_query(self, batch: dict):
        """[B, D] normalised query vectors from user, history [B, L], user_feats [B, F] and, with
        model.time_features, time_context [B, 2] (`time_features`).

        Raises:
          ValueError: naming both shapes, when an input does not have the history's B rows.
        """
        self._check_query(batch)
        parts = []
        if self.cfg.reads_history:
            history_BxL = batch["history"]
            emb_BxLxE = self.item_table(history_BxL)
            if self.history_attention is not None:
                parts.append(self.history_attention(emb_BxLxE, history_BxL))
            else:
                parts.append(layers.pool_history(emb_BxLxE, history_BxL, self.cfg.history_pooling,
                                                 self.cfg.recency_decay))
        if self.user_table is not None:
            parts.append(self.user_table(batch["user"]))
        if len(self.user_feature_tables):
            feats_BxF = batch["user_feats"]
            parts.append(sum(t(feats_BxF[:, i]) for i, t in enumerate(self.user_feature_tables)))
        if self.time_proj is not None:
            parts.append(self.time_proj(time_features(batch["time_context"])))
        return _normalize(_project(self.query_mlp, parts))

    def embed_items(self, batch: dict):
        """[..., D] normalised item vectors from item [...], item_genres [..., G], item_year [...].

        Raises:
          ValueError: naming both shapes, when genres or years do not match the items' shape.
        """
        self._check_items(batch)
        parts = [self.item_table(batch["item"])]
        if self.genre_proj is not None:
            parts.append(self.genre_proj(batch["item_genres"]))
            parts.append(self.year_table(batch["item_year"]))
        return _normalize(_project(self.item_mlp, parts))

    def __call__(self, batch: dict):
        """(q [B, D], c [B, D], temperature) of B queries and their positive items."""
        rows, first = self._check_query(batch)
        item = jnp.shape(batch["item"])
        if item != (rows,):
            raise ValueError(f"item {item} must be [B]: one positive per query of {first}")
        return self.embed_query(batch), self.embed_items(batch), self.temperature()

    def _check_query(self, batch: dict) -> tuple[int, str]:
        """(B, "name shape" of the input B is read from): every query input must have B rows."""
        want = {"user": () if self.user_table is not None else None,
                "user_feats": (len(self.user_feature_tables),)
                if len(self.user_feature_tables) else None,
                "time_context": (NUM_TIME_FEATURES,) if self.time_proj is not None else None}
        if self.cfg.reads_history:
            history = jnp.shape(batch["history"])
            if len(history) != 2:
                raise ValueError(f"history {history} must be [B, L]")
            rows, first = history[0], f"history {history}"
        else:  # B from the first input the tower reads (there is one: ModelConfig checks it)
            name = next(n for n, shape in want.items() if shape is not None)
            rows, first = jnp.shape(batch[name])[0], f"{name} {jnp.shape(batch[name])}"
        for name, shape in want.items():
            if shape is None:
                continue
            got = jnp.shape(batch[name])
            if got != (rows, *shape):
                raise ValueError(f"{name} {got} does not fit {first}: expected "
                                 f"{'[B]' if not shape else f'[B, {shape[0]}]'}")
        return rows, first

    def _check_items(self, batch: dict) -> None:
        item = jnp.shape(batch["item"])
        if self.genre_proj is None:
            return
        genres, year = jnp.shape(batch["item_genres"]), jnp.shape(batch["item_year"])
        if genres != (*item, self.genre_proj.in_features):
            raise ValueError(f"item_genres {genres} must be item {item} plus "
                             f"[{self.genre_proj.in_features}] genres")
        if year != item:
            raise ValueError(f"item_year {year} must match item {item}")


def _project(mlp, parts):
    """A tower's embeddings side by side, through its MLP when it has one: [B, D]."""
    x_BxI = jnp.concatenate(parts, axis=-1)
    return x_BxI if mlp is None else mlp(x_BxI)


def _normalize(x_BxD):
    x_BxD = x_BxD.astype(jnp.float32)  # the norm accumulates in float32 (bf16 towers too)
    return x_BxD / jnp.sqrt(jnp.maximum(jnp.sum(x_BxD * x_BxD, axis=-1, keepdims=True), 1e-12))
