"""The evaluation protocol: leave-last-out targets ranked against the whole catalogue."""

from __future__ import annotations

import dataclasses

import numpy as np

from recsys import sharding
from recsys.config import EvalConfig
from recsys.data.batches import event_query_inputs, item_inputs
from recsys.data.dataset import Dataset, FeatureTables
from recsys.eval import metrics, ranking
from recsys.models import layers

CHUNK = 4096  # rows embedded per jitted call (the last chunk is padded: one compile)


_embed_items = layers.jitted("embed_items")
_embed_queries = layers.jitted("embed_query")


def _in_chunks(fn, model, inputs: dict) -> np.ndarray:
    n = len(next(iter(inputs.values())))
    out = []
    for start in range(0, n, CHUNK):
        part = {k: v[start:start + CHUNK] for k, v in inputs.items()}
        size = len(next(iter(part.values())))
        if n > CHUNK and size < CHUNK:
            part = {k: np.concatenate([v, np.repeat(v[-1:], CHUNK - size, axis=0)])
                    for k, v in part.items()}
        out.append(sharding.to_host(fn(model, part))[:size])  # the model may span processes
    return np.concatenate(out).astype(np.float32)


def item_vectors(model, tables: FeatureTables) -> np.ndarray:
    """Candidate-tower vectors of every item row (row 0 is padding): [V, D]."""
    rows = np.arange(len(tables.item_year), dtype=np.int32)
    return _in_chunks(_embed_items, model, item_inputs(tables, rows))


def query_vectors(model, ds: Dataset, positions: np.ndarray) -> np.ndarray:
    """Query-tower vectors for events at `positions`, from the history strictly before: [Q, D]."""
    return _in_chunks(_embed_queries, model, event_query_inputs(ds, positions))


def eval_positions(ds: Dataset, split: str, cfg: EvalConfig) -> np.ndarray:
    """The evaluated events: every user's val/test event, or a seeded subset of max_users."""
    positions = ds.eval_positions(split)
    if 0 < cfg.max_users < len(positions):
        keep = np.random.default_rng(0).choice(len(positions), cfg.max_users, replace=False)
        positions = positions[np.sort(keep)]
    return positions


@dataclasses.dataclass
class RetrievalEval:
    metrics: dict  # hr@K..., ndcg@10
    positions: np.ndarray  # [Q] evaluated events
    query_vectors: np.ndarray  # [Q, D]
    item_vectors: np.ndarray  # [V, D]
    ranks: np.ndarray  # [Q] 0-based rank of each target


def evaluate_retrieval(model, ds: Dataset, split: str, cfg: EvalConfig) -> RetrievalEval:
    """Ranks each target among all items, excluding the user's earlier items; ties count against."""
    model.eval()
    positions = eval_positions(ds, split, cfg)
    q_QxD = query_vectors(model, ds, positions)
    items_VxD = item_vectors(model, ds.features)
    offsets, excluded = ds.earlier_items(positions)
    ranks = ranking.target_ranks(q_QxD, items_VxD, ds.seq_items[positions], offsets, excluded,
                                 item_chunk=cfg.item_chunk)
    return RetrievalEval(metrics.ranking_metrics(ranks, cfg.ks), positions, q_QxD, items_VxD,
                         np.asarray(ranks))


def popularity_ranks(ds: Dataset, split: str, cfg: EvalConfig) -> np.ndarray:
    """Target ranks [Q] of the popularity baseline on `split`: every user gets the items by how
    often they occur among the events before the split (train; train + val for test), with the
    protocol's users, exclusions and tie rule."""
    counts_V = ds.item_counts(ds.train_positions("train" if split == "val" else "train+val"))
    positions = eval_positions(ds, split, cfg)
    offsets, excluded = ds.earlier_items(positions)
    return ranking.target_ranks(np.ones((len(positions), 1), np.float32),
                                counts_V.astype(np.float32)[:, None], ds.seq_items[positions],
                                offsets, excluded, item_chunk=cfg.item_chunk)
