"""Ranker examples: events a retrieval model never trained on, with its own top-R as candidates.

A retrieval model is over-confident on the events it was trained on (their targets score far
higher than any unseen test target does), so a ranker trained on those events learns to trust
the retrieval score too much. With `ranker.events=holdout`, a *shadow* retrieval model
with the same config is trained on every user's events except the latest m + 1
(m = ranker_holdout_events), and the ranker learns from those held-out events (the real
validation event among them), which look to the shadow as test events look to the served
model. Keep m small: the further an event lies past the shadow's last training event, the
staler the shadow's view of that user, and the less its features resemble serving's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recsys.data.dataset import Dataset
from recsys.eval import protocol, ranking
from recsys.models.ranker_inputs import ItemTimeline, RankerTables, ranker_inputs


@dataclasses.dataclass(frozen=True)
class Events:
    """Ranker events with what the request side knows, and the retrieval model's top-R."""

    positions: np.ndarray  # [M] positions in the dataset
    q: np.ndarray  # [M, D] query vectors of the feature model
    users: np.ndarray  # [M] user rows
    history: np.ndarray  # [M, L] item rows before the event
    times: np.ndarray  # [M] event times (the request time)
    last_times: np.ndarray  # [M] time of the event before (-1 when none)
    targets: np.ndarray  # [M] the true item rows
    candidates: np.ndarray  # [M, R] exact top-R item rows, the user's earlier items excluded

    def take(self, idx) -> Events:
        return Events(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


def holdout_dataset(ds: Dataset, m: int, fold: int = 0,
                    folds: int = 1) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """The dataset without the latest m + 1 events (keeping >= 3) of the users of one fold
    (user row % folds == fold), and those held-out events.

    Returns:
      shadow: a Dataset (same vocabularies) whose users end before their held-out events; its
        own last event per user is its test event, never trained on.
      train_positions: held-out positions (of `ds`) for ranker training.
      val_positions: each user's validation position in `ds` (held out wherever m >= 1).
    """
    n_U = np.diff(ds.offsets)[1:]
    drop_U = np.clip(n_U - 3, 0, m) * (np.arange(1, len(n_U) + 1) % folds == fold)
    keep_U = n_U - drop_U
    starts_U = ds.offsets[1:-1]
    local = np.arange(len(ds.seq_items)) - np.repeat(starts_U, n_U)
    user_of = np.repeat(np.arange(len(n_U)), n_U)
    kept = local < keep_U[user_of]
    offsets = np.zeros_like(ds.offsets)
    offsets[2:] = np.cumsum(keep_U)
    shadow = dataclasses.replace(ds, offsets=offsets, seq_users=ds.seq_users[kept],
                                 seq_items=ds.seq_items[kept], seq_times=ds.seq_times[kept])
    # Unseen by the shadow: local indices keep-1 (its test event) .. n-2 (the real validation).
    unseen = (local >= keep_U[user_of] - 1) & (local <= n_U[user_of] - 2)
    is_val = local == n_U[user_of] - 2
    return (shadow, np.flatnonzero(unseen & ~is_val).astype(np.int64),
            np.flatnonzero(unseen & is_val).astype(np.int64))


def event_log_timeline(ds: Dataset) -> ItemTimeline:
    """Item timeline of every non-test event: what the served artifacts hold (users.npz)."""
    keep = np.ones(len(ds.seq_items), bool)
    keep[ds.offsets[2:] - 1] = False
    return ItemTimeline.build(ds.seq_items[keep], ds.seq_times[keep], ds.items.size)


def make_tables(ds: Dataset, items_VxD: np.ndarray, logpop_V: np.ndarray,
                timeline: ItemTimeline) -> RankerTables:
    t = ds.features
    return RankerTables(items_VxD, t.item_genres, t.item_year, logpop_V, t.user_features, timeline)


def make_events(model, ds: Dataset, positions: np.ndarray, items_VxD: np.ndarray,
                num_candidates: int) -> Events:
    """Query vectors, request context and exact top-R candidates of `model` for `positions`."""
    positions = np.asarray(positions, np.int64)
    q_MxD = protocol.query_vectors(model, ds, positions)
    offsets, excluded = ds.earlier_items(positions)
    r = min(num_candidates, len(items_VxD) - 1)
    _, cand_MxR = ranking.exact_topk(q_MxD, items_VxD, r, offsets, excluded)
    users = ds.seq_users[positions]
    has_prev = positions > ds.offsets[users]
    last = np.where(has_prev, ds.seq_times[np.maximum(positions - 1, 0)], -1)
    return Events(positions, q_MxD, users, ds.history(positions), ds.seq_times[positions], last,
                  ds.seq_items[positions], np.asarray(cand_MxR, np.int64))


def retrieved_only(ev: Events) -> Events:
    """The events whose target is among their top-R: the ranker only ever orders retrieved items,
    so an event retrieval missed would teach it what a missed item looks like instead."""
    return ev.take(np.flatnonzero((ev.candidates == ev.targets[:, None]).any(1)))


def listwise_rows(ev: Events, num_negatives: int, num_random: int, rng: np.random.Generator,
                  num_items: int) -> np.ndarray:
    """[B, 1 + K] candidate rows: the target, then K negatives (row 0 never; target never again).

    num_negatives == 0 takes the whole top-R in order (the target removed, or the last dropped),
    as serving sees it; otherwise K - num_random hard ones from the top-R and num_random uniform.
    """
    cand_BxR, targets_B = ev.candidates, ev.targets
    b, r = cand_BxR.shape
    if num_negatives == 0:
        is_t = cand_BxR == targets_B[:, None]
        drop = np.where(is_t.any(1), is_t.argmax(1), r - 1)
        keep = np.ones((b, r), bool)
        keep[np.arange(b), drop] = False
        neg_BxK = cand_BxR[keep].reshape(b, r - 1)
    else:
        hard = max(num_negatives - num_random, 0)
        cols_BxH = rng.integers(0, r, (b, hard))
        neg_BxK = np.concatenate([np.take_along_axis(cand_BxR, cols_BxH, axis=1),
                                  rng.integers(1, num_items + 1, (b, num_negatives - hard))], 1)
    bad = (neg_BxK == targets_B[:, None]) | (neg_BxK <= 0)
    neg_BxK = np.where(bad, rng.integers(1, num_items + 1, neg_BxK.shape), neg_BxK)
    return np.concatenate([targets_B[:, None], neg_BxK], axis=1)


def batch_inputs(tables: RankerTables, ev: Events, cand_BxN: np.ndarray) -> dict:
    return ranker_inputs(tables, ev.q, ev.users, ev.history, ev.times, ev.last_times,
                         np.maximum(cand_BxN, 0))
