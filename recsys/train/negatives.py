"""Negatives of the retrieval loss as one typed structure, built on the host for each batch, and
the streaming logQ estimate the train step carries beside (model, optimizer).

Sources (Yang et al. 2020: each corrected by its own log q, the probability it draws an item):
  in-batch  every other positive of the global batch, drawn by popularity: log q from training
            counts (train.logq_estimate=counts) or the streaming estimate (=streaming);
  uniform   M catalogue items drawn uniformly per step, shared by every row: log q = log(1/N);
  mined     H items per row from a rank band of a recent snapshot of the model
            (recsys.train.mining): log q per train.mined_correction; embedded by the step's
            candidate tower, or read from the snapshot's item vectors (train.mined_vectors);
  hard      of all those, only the k highest-scoring per row (train.hard_negatives).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx, struct

from recsys import sharding
from recsys.config import TrainConfig
from recsys.data.batches import item_inputs
from recsys.data.dataset import FeatureTables
from recsys.models import losses
from recsys.models.logq import StreamingLogQ
from recsys.train import sparse

if TYPE_CHECKING:
    from recsys.train.mining import MinedNegatives


@struct.dataclass
class Negatives:
    """Everything the retrieval loss uses besides the query and positive vectors (a pytree).

    Item row 0 means "no negative" and is always masked. A log q of None means no correction.

    Attributes:
      log_q: [B] log q of each positive as another row's in-batch negative. With a streaming
        estimate in the training state, the train step replaces it (see `LogQEstimate`).
      uniform: candidate-tower inputs of M uniform draws shared by every row (item [M],
        item_genres [M, G], item_year [M]), or None.
      uniform_log_q: [M] log(1/N), the probability of each draw.
      mined: candidate-tower inputs of H mined items per row (item [B, H], ...), or None; only
        item [B, H] when mined_vectors is given.
      mined_log_q: [B, H], as train.mined_correction chose it.
      mined_vectors: [B, H, D] vectors of the mined items from the snapshot they were mined with
        (train.mined_vectors="cached"): constants of the step, used instead of embedding `mined`
        (no gradient reaches the candidate tower through them); None: embedded.
      hard_k: keep only the k highest-scoring negatives per row, over every source (0 = all).
      remove_accidental_hits: mask negatives (every source) that are the row's own positive.
    """

    log_q: jax.Array | None = None
    uniform: dict | None = None
    uniform_log_q: jax.Array | None = None
    mined: dict | None = None
    mined_log_q: jax.Array | None = None
    mined_vectors: jax.Array | None = None
    hard_k: int = struct.field(pytree_node=False, default=0)
    remove_accidental_hits: bool = struct.field(pytree_node=False, default=True)

    def check(self, batch_size: int) -> None:
        """Raises ValueError naming both shapes when a field does not fit a batch of B rows."""
        b = batch_size
        if self.log_q is not None and np.shape(self.log_q) != (b,):
            raise ValueError(f"log_q {np.shape(self.log_q)} must be [B] for the batch's "
                             f"B = {b} positives")
        if self.uniform is not None:
            m = np.shape(self.uniform["item"])
            if len(m) != 1:
                raise ValueError(f"uniform item {m} must be [M]: draws shared by every row")
            if self.uniform_log_q is not None and np.shape(self.uniform_log_q) != m:
                raise ValueError(f"uniform_log_q {np.shape(self.uniform_log_q)} must match "
                                 f"uniform item {m}")
        if self.mined is not None:
            bh = np.shape(self.mined["item"])
            if len(bh) != 2 or bh[0] != b:
                raise ValueError(f"mined item {bh} must be [B, H] for the batch's B = {b} "
                                 "positives")
            if self.mined_log_q is not None and np.shape(self.mined_log_q) != bh:
                raise ValueError(f"mined_log_q {np.shape(self.mined_log_q)} must match "
                                 f"mined item {bh}")
            vectors = None if self.mined_vectors is None else np.shape(self.mined_vectors)
            if vectors is not None and (len(vectors) != 3 or vectors[:2] != bh):
                raise ValueError(f"mined_vectors {vectors} must be [B, H, D] for mined item {bh}")
        elif self.mined_vectors is not None:
            raise ValueError(f"mined_vectors {np.shape(self.mined_vectors)} need mined items "
                             "(mined is None)")

    def loss(self, model, q_BxD, c_BxD, temperature, item_B):
        """Sampled softmax of the batch's queries over their positives and these negatives.

        Args:
          model: the two-tower model, whose candidate tower embeds the uniform and mined items.
          q_BxD, c_BxD, temperature: the model's outputs for the batch; item_B: positive items.
        """
        self.check(np.shape(item_B)[0])
        extra = []
        if self.uniform is not None:
            extra.append(losses.NegativeSource(model.embed_items(self.uniform),
                                               self.uniform["item"], self.uniform_log_q))
        if self.mined is not None:
            c = (model.embed_items(self.mined) if self.mined_vectors is None
                 else jax.lax.stop_gradient(self.mined_vectors))
            extra.append(losses.NegativeSource(c, self.mined["item"], self.mined_log_q))
        return losses.sampled_softmax_loss(
            q_BxD, c_BxD, temperature, item_B, log_q_B=self.log_q, extra=tuple(extra),
            hard_negatives=self.hard_k, remove_accidental_hits=self.remove_accidental_hits)


class LogQEstimate(nnx.Module):
    """The streaming logQ estimate (recsys.models.logq), the third part of the training state.

    It is counted from each batch's items rather than trained by gradients, so it lives beside
    the model and the optimizer, not inside either; checkpoints save and restore it with them.
    Its arrays are split over devices like table rows.
    """

    def __init__(self, rule: StreamingLogQ):
        self.rule = rule
        self.logq = nnx.data(sparse.row_state(rule.init()))  # last_seen, gap, sightings [buckets]

    def observe(self, item_B, step):
        """Counts the global batch's items at `step` (1-based); returns their log q [B]."""
        arrays = self.rule.observe({k: v[...] for k, v in self.logq.items()}, item_B, step)
        for k, v in self.logq.items():
            v[...] = arrays[k]
        return self.rule.log_q(arrays, item_B, item_B.shape[0])


def uniform(tables: FeatureTables, num_items: int, m: int, seed: int, step: int):
    """M items drawn uniformly (with replacement) from rows 1..num_items for global step `step`.

    A pure function of (seed, step), so a resumed run draws what an uninterrupted one would.

    Returns:
      inputs: candidate-tower inputs, item [M], item_genres [M, G], item_year [M].
      log_q_M: float32 log(1/num_items), the probability of each draw.
    """
    items_M = np.random.default_rng([seed, step, 1]).integers(1, num_items + 1, m)
    return item_inputs(tables, items_M), np.full(m, -np.log(num_items), np.float32)


class Sampler:
    """Builds each batch's `Negatives` on the host, from this process's rows of the batch.

    Everything is a pure function of (seed, step, positions) and the mined table of `step`,
    which is itself saved beside the checkpoints, so a resumed run sees the negatives an
    uninterrupted one would have. `at` may run on another thread than the loop.
    """

    def __init__(self, features: FeatureTables, item_counts_V: np.ndarray, cfg: TrainConfig,
                 mesh: jax.sharding.Mesh, miner: MinedNegatives | None = None):
        """features: the item feature tables (uniform and embedded mined items); item_counts_V:
        how often each item row is a training target (`Dataset.item_counts(positions)`, or a
        prepared directory's `item_counts`)."""
        self.features, self.cfg, self.miner = features, cfg, miner
        self.num_items = len(item_counts_V) - 1  # row 0 is padding
        # With the streaming estimate the train step computes the positives' log q itself.
        counts = cfg.logq_correction and cfg.logq_estimate == "counts"
        self.log_q_V = losses.log_sampling_probability(item_counts_V) if counts else None
        # Uniform draws are split over devices like batch rows: this process keeps its own.
        self.uniform_rows = (sharding.process_rows(mesh, cfg.uniform_negatives)
                             if cfg.uniform_negatives else None)

    def at(self, step: int, positions_B: np.ndarray, item_B: np.ndarray) -> Negatives:
        """The negatives of global batch `step`, for this process's positions and positives."""
        cfg = self.cfg
        neg = {"log_q": None if self.log_q_V is None else self.log_q_V[item_B]}
        if cfg.uniform_negatives:
            inputs, log_q_M = uniform(self.features, self.num_items, cfg.uniform_negatives,
                                      cfg.seed, step)
            neg["uniform"] = {k: v[self.uniform_rows] for k, v in inputs.items()}
            neg["uniform_log_q"] = log_q_M[self.uniform_rows] if cfg.logq_correction else None
        if self.miner is not None:
            items_BxH, band_log_q_B, vectors_BxHxD = self.miner.at(step, positions_B)
            if vectors_BxHxD is None:
                neg["mined"] = item_inputs(self.features, items_BxH)
            else:  # the snapshot's vectors: the candidate tower embeds only the batch's rows
                neg["mined"] = {"item": items_BxH}
                neg["mined_vectors"] = vectors_BxHxD
            neg["mined_log_q"] = mined_log_q(cfg, band_log_q_B, items_BxH.shape[1],
                                             self.num_items)
        return Negatives(**neg, hard_k=cfg.hard_negatives,
                         remove_accidental_hits=cfg.remove_accidental_hits)


def mined_log_q(cfg: TrainConfig, band_log_q_B: np.ndarray, h: int, num_items: int):
    """[B, H] log q of mined items per train.mined_correction, or None for no correction.

    "band" gives log(1/items left in the row's band), the probability of each draw; "uniform"
    gives log(1/N), weighting mined items like uniform draws; "none" leaves them uncorrected.
    Mined items are not a sample of the whole catalogue, so no choice makes the softmax
    unbiased; it sets how much they weigh against the other sources, and is tuned on validation.
    """
    if not cfg.logq_correction or cfg.mined_correction == "none":
        return None
    if cfg.mined_correction == "uniform":
        band_log_q_B = np.full(len(band_log_q_B), -np.log(num_items), np.float32)
    return np.repeat(band_log_q_B[:, None], h, axis=1)
