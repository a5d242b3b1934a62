"""Ranker training on the retrieval model's own candidates (its top-R are the hard negatives)."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from recsys import sharding
from recsys.config import Config
from recsys.data.dataset import Dataset, FeatureTables
from recsys.eval import metrics, protocol, ranking
from recsys.models import losses
from recsys.models.ranker import Ranker
from recsys.train import checkpoint, steps
from recsys.train import state as state_lib
from recsys.train.loop import Trained, vocabularies


@dataclasses.dataclass(frozen=True)
class RankerInputs:
    """Everything the ranker reads per candidate, beyond the request: by item row."""

    tables: FeatureTables
    item_vectors: np.ndarray  # [V, D] candidate-tower vectors
    item_logpop: np.ndarray  # [V] log(1 + training count)


def candidate_features(inputs: RankerInputs, q_BxD, user_B, cand_BxN) -> dict:
    """The ranker's input dict for B queries and N candidate item rows each."""
    return {"q": np.asarray(q_BxD, np.float32), "c": inputs.item_vectors[cand_BxN],
            "item_genres": inputs.tables.item_genres[cand_BxN],
            "item_year": inputs.tables.item_year[cand_BxN],
            "item_logpop": inputs.item_logpop[cand_BxN],
            "user_feats": inputs.tables.user_features[user_B]}


def ranker_loss(model, batch: dict, cfg):
    """Listwise softmax: column 0 is the true item, the rest are negatives."""
    scores_BxN = model(batch)
    return losses.softmax_cross_entropy(scores_BxN, np.zeros(scores_BxN.shape[0], np.int32))


def retrieve_exact(ds: Dataset, q_QxD, positions, r: int, items_VxD) -> np.ndarray:
    """Exact top-R item rows per event, excluding the user's earlier items: [Q, R]."""
    offsets, excluded = ds.earlier_items(positions)
    _, rows = ranking.exact_topk(q_QxD, items_VxD, r, offsets, excluded)
    return np.asarray(rows)


def train_ranker(cfg: Config, ds: Dataset, retrieval: Trained, workdir: pathlib.Path,
                 mesh: jax.sharding.Mesh) -> tuple[Trained, RankerInputs]:
    """Trains the ranker on events whose candidates come from the frozen retrieval model."""
    tc, r = cfg.train, cfg.serve.num_candidates
    rng = np.random.default_rng(tc.seed)
    # Data: a seeded sample of training events with their retrieved top-R candidates.
    two_tower = retrieval.model()
    positions = ds.train_positions(cfg.data.trained_on, cfg.data.max_examples_per_user)
    wanted = min(len(positions), max(tc.ranker_steps * tc.ranker_batch_size // 4, 4096))
    positions = np.sort(rng.choice(positions, wanted, replace=False))
    items_VxD = protocol.item_vectors(two_tower, ds.features)
    counts = ds.item_counts(ds.train_positions(cfg.data.trained_on))
    inputs = RankerInputs(ds.features, items_VxD, np.log1p(counts).astype(np.float32))
    q_MxD = protocol.query_vectors(two_tower, ds, positions)
    cand_MxR = retrieve_exact(ds, q_MxD, positions, r, items_VxD)
    users_M, targets_M = ds.seq_users[positions], ds.seq_items[positions]

    def batch_at(step):
        idx = np.random.default_rng([tc.seed, step]).choice(len(positions), tc.ranker_batch_size)
        return make_listwise_batch(inputs, q_MxD[idx], users_M[idx], targets_M[idx],
                                   cand_MxR[idx], tc.ranker_negatives,
                                   np.random.default_rng([tc.seed, step, 1]), ds.num_items)

    # Model and optimizer, born sharded; resume from this workdir's ranker checkpoint.
    vocab = vocabularies(ds)
    graphdef, state, shardings = state_lib.create(
        lambda rngs: Ranker(cfg.model, vocab, rngs),
        state_lib.make_optimizer(tc, tc.ranker_learning_rate), tc.seed + 1, mesh)
    mngr = checkpoint.make_manager(workdir / "checkpoints" / "ranker", tc)
    expected = checkpoint.as_json({"model.ranker_hidden_dims": cfg.model.ranker_hidden_dims,
                                   "model.out_dim": cfg.model.out_dim, **{
                                       f"vocab.{k}": v for k, v in dataclasses.asdict(vocab).items()
                                       if k != "num_items"}})
    restored = checkpoint.restore_or_none(mngr, state_lib.abstract_state(state, shardings), expected)
    start, loss = (restored[1]["step"], restored[1]["loss"]) if restored else (0, float("nan"))
    if restored:
        state = restored[0]
    train_step = steps.make_train_step(graphdef, ranker_loss, tc, shardings, mesh)
    bar = tqdm(total=tc.ranker_steps, initial=start, desc="ranker", dynamic_ncols=True,
               disable=True if jax.process_index() != 0 else None)
    with jax.set_mesh(mesh):
        for step in range(start, tc.ranker_steps):
            batch = sharding.shard_batch(_local_rows(batch_at(step)), mesh)
            state, loss_arr = train_step(state, batch)
            bar.update(1)
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.ranker_steps:
                loss = float(loss_arr)
                bar.set_postfix(loss=f"{loss:.4f}")
        if tc.ranker_steps > start:
            checkpoint.save(mngr, tc.ranker_steps, state, {**expected, "step": tc.ranker_steps,
                                                           "loss": loss})
        checkpoint.wait(mngr)
        mngr.close()
    bar.close()
    trained = Trained(graphdef, state, {"ranker/final_loss": loss, "ranker/steps": tc.ranker_steps})
    trained.metrics.update(validate(cfg, ds, two_tower, trained, inputs))
    return trained, inputs


def make_listwise_batch(inputs: RankerInputs, q_BxD, users_B, targets_B, cand_BxR,
                        num_negatives: int, rng: np.random.Generator, num_items: int) -> dict:
    """[target, negatives...] per event: 3/4 hard ones from the top-R, 1/4 uniform at random."""
    b, r = cand_BxR.shape
    hard = num_negatives - num_negatives // 4
    cols_BxH = rng.integers(0, r, (b, hard))
    neg_BxK = np.concatenate([np.take_along_axis(cand_BxR, cols_BxH, axis=1),
                              rng.integers(1, num_items + 1, (b, num_negatives - hard))], axis=1)
    bad = (neg_BxK == targets_B[:, None]) | (neg_BxK <= 0)
    neg_BxK = np.where(bad, rng.integers(1, num_items + 1, neg_BxK.shape), neg_BxK)
    cand_BxN = np.concatenate([targets_B[:, None], neg_BxK], axis=1)
    return candidate_features(inputs, q_BxD, users_B, cand_BxN)


def _local_rows(batch: dict) -> dict:
    """This process's slice of a batch every process built identically."""
    n = len(batch["q"]) // jax.process_count()
    lo = jax.process_index() * n
    return {k: v[lo:lo + n] for k, v in batch.items()}


def validate(cfg: Config, ds: Dataset, two_tower, ranker: Trained, inputs: RankerInputs) -> dict:
    """Validation HR@10/NDCG@10 of retrieval order vs ranker order over exact top-R candidates."""
    ev = protocol.evaluate_retrieval(two_tower, ds, "val", cfg.eval)
    cand_QxR = retrieve_exact(ds, ev.query_vectors, ev.positions, cfg.serve.num_candidates,
                              inputs.item_vectors)
    scores_QxR = score_candidates(ranker.model(), inputs, ev.query_vectors,
                                  ds.seq_users[ev.positions], cand_QxR)
    reranked = np.take_along_axis(cand_QxR, np.argsort(-scores_QxR, axis=1, kind="stable"), 1)
    targets = ds.seq_items[ev.positions]
    return {"ranker/val_ndcg@10": metrics.ndcg_at_k(reranked, targets, 10),
            "ranker/val_hr@10": metrics.hit_rate_at_k(reranked, targets, 10),
            "ranker/val_retrieval_ndcg@10": metrics.ndcg_at_k(cand_QxR, targets, 10)}


@nnx.jit
def _score(ranker, batch):
    return ranker(batch)


def score_candidates(ranker, inputs: RankerInputs, q_QxD, users_Q, cand_QxR,
                     block: int = 256) -> np.ndarray:
    """Ranker scores for candidates in blocks of queries: [Q, R] (invalid rows -1 score -inf)."""
    out = []
    for lo in range(0, len(q_QxD), block):
        cand = np.maximum(cand_QxR[lo:lo + block], 0)
        out.append(np.asarray(_score(ranker, candidate_features(
            inputs, q_QxD[lo:lo + block], users_Q[lo:lo + block], cand))))
    scores = np.concatenate(out)
    return np.where(cand_QxR > 0, scores, -np.inf)
