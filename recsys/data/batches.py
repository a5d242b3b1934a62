"""Model inputs from positions: feature gathering and a shuffled, seeded, resumable batch order."""

from __future__ import annotations

import numpy as np

from recsys.data.dataset import Dataset, FeatureTables
from recsys.features import query_inputs, time_context


def event_query_inputs(ds: Dataset, positions_B: np.ndarray) -> dict:
    """Query inputs of the events at these positions: the history strictly before, and the time
    context with the event's own time as the request time."""
    positions_B = np.asarray(positions_B, np.int64)
    return query_inputs(ds.features.user_features, ds.seq_users[positions_B],
                        ds.history(positions_B),
                        time_context(ds.seq_times[positions_B], ds.previous_times(positions_B)))


def item_inputs(tables: FeatureTables, item_B: np.ndarray) -> dict:
    """What the candidate tower reads for B items."""
    item_B = np.asarray(item_B, np.int32)
    return {"item": item_B, "item_genres": tables.item_genres[item_B],
            "item_year": tables.item_year[item_B]}


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
