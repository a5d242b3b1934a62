"""Model inputs from positions: feature gathering and a shuffled, seeded, resumable batch order."""

from __future__ import annotations

import numpy as np

from recsys.data.dataset import Dataset, FeatureTables


def query_inputs(tables: FeatureTables, user_B: np.ndarray, history_BxL: np.ndarray,
                 time_context_Bx2: np.ndarray | None = None) -> dict:
    """What the query tower reads for B queries (time_context: see `time_context`)."""
    user_B = np.asarray(user_B, np.int32)
    out = {"user": user_B, "history": np.asarray(history_BxL, np.int32),
           "user_feats": tables.user_features[user_B]}
    if time_context_Bx2 is not None:
        out["time_context"] = np.asarray(time_context_Bx2, np.int32)
    return out


def time_context(request_seconds_B: np.ndarray, previous_seconds_B: np.ndarray) -> np.ndarray:
    """[B, 2] int32 minutes since 1970: the request time and the user's previous event (-1: none).

    The query tower turns these into its time features (model.time_features); serving passes
    the request time and the user's latest stored event the same way.
    """
    prev_B = np.asarray(previous_seconds_B, np.int64)
    return np.stack([np.asarray(request_seconds_B, np.int64) // 60,
                     np.where(prev_B >= 0, prev_B // 60, -1)], axis=1).astype(np.int32)


def event_query_inputs(ds: Dataset, positions_B: np.ndarray) -> dict:
    """Query inputs of the events at these positions: the history strictly before, and the time
    context with the event's own time as the request time."""
    positions_B = np.asarray(positions_B, np.int64)
    return query_inputs(ds.features, ds.seq_users[positions_B], ds.history(positions_B),
                        time_context(ds.seq_times[positions_B], ds.previous_times(positions_B)))


def item_inputs(tables: FeatureTables, item_B: np.ndarray) -> dict:
    """What the candidate tower reads for B items."""
    item_B = np.asarray(item_B, np.int32)
    return {"item": item_B, "item_genres": tables.item_genres[item_B],
            "item_year": tables.item_year[item_B]}


def prefixed(prefix: str, inputs: dict) -> dict:
    """`inputs` with every key prefixed, e.g. item inputs of negatives as "uniform_item", ..."""
    return {prefix + k: v for k, v in inputs.items()}


def unprefixed(prefix: str, batch: dict) -> dict:
    """The keys of `batch` that start with `prefix`, without it (the inverse of `prefixed`)."""
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


def uniform_negatives(tables: FeatureTables, num_items: int, m: int, seed: int,
                      step: int) -> dict:
    """M items drawn uniformly (with replacement) from rows 1..num_items for global step `step`.

    A pure function of (seed, step), so a resumed run draws what an uninterrupted one would.
    Keys: uniform_item [M], uniform_item_genres [M, G], uniform_item_year [M], and
    uniform_log_q [M] = log(1/num_items), the probability of each draw.
    """
    items_M = np.random.default_rng([seed, step, 1]).integers(1, num_items + 1, m)
    out = prefixed("uniform_", item_inputs(tables, items_M))
    out["uniform_log_q"] = np.full(m, -np.log(num_items), np.float32)
    return out


def example_inputs(ds: Dataset, positions_B: np.ndarray) -> dict:
    """Query and positive-item inputs for events at these positions (history strictly before)."""
    positions_B = np.asarray(positions_B, np.int64)
    batch = event_query_inputs(ds, positions_B)
    batch.update(item_inputs(ds.features, ds.seq_items[positions_B]))
    return batch


class BatchOrder:
    """Which training positions form global batch `step`: a fresh seeded permutation per epoch.

    The order is a pure function of (seed, step), so a run resumed at step s sees exactly the
    batches a run that never stopped would have seen.
    """

    def __init__(self, positions: np.ndarray, batch_size: int, seed: int):
        if len(positions) == 0:
            raise ValueError("no training examples")
        self.positions = np.asarray(positions, np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> float:
        return len(self.positions) / self.batch_size

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(
                len(self.positions))}
        return self._cache[epoch]

    def at(self, step: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """Positions of this process's contiguous slice of global batch `step`."""
        per_process = self.batch_size // process_count
        first = step * self.batch_size + process_index * per_process
        flat = first + np.arange(per_process, dtype=np.int64)
        n = len(self.positions)
        epochs, within = flat // n, flat % n
        out = np.empty(per_process, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.positions[self._perm(int(epoch))[within[sel]]]
        return out
