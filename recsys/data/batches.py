"""Model inputs from positions: feature gathering and a shuffled, seeded, resumable batch order."""

from __future__ import annotations

import functools

import numpy as np

from recsys.data.dataset import Dataset, FeatureTables
from recsys.features import TIME_CONTEXT, query_inputs, time_context


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


def example_inputs(ds: Dataset, positions_B: np.ndarray, names=None) -> dict:
    """Query and positive-item inputs for events at these positions (history strictly before).

    names: the inputs to build (e.g. `two_tower.input_names`; None = all of them): the
    training loop builds only what its model reads, as unused features cost host time every
    step.
    """
    positions_B = np.asarray(positions_B, np.int64)
    user_B = ds.seq_users[positions_B].astype(np.int32)
    item_B = ds.seq_items[positions_B].astype(np.int32)
    build = {
        "user": lambda: user_B,
        "history": lambda: ds.history(positions_B),
        "user_feats": lambda: ds.features.user_features[user_B],
        TIME_CONTEXT: lambda: time_context(ds.seq_times[positions_B],
                                           ds.previous_times(positions_B)),
        "item": lambda: item_B,
        "item_genres": lambda: ds.features.item_genres[item_B],
        "item_year": lambda: ds.features.item_year[item_B],
    }
    names = build if names is None else names
    unknown = sorted(set(names) - set(build))
    if unknown:
        raise KeyError(f"no example input named {unknown}; known: {sorted(build)}")
    return {k: build[k]() for k in names}


# ---- the example order ---------------------------------------------------------------------
# Shared by BatchOrder (examples in memory) and recsys.data.grain_input (prepared examples), so
# both put the same examples in the same rows of every global batch.
#
# Examples are numbered in *storage order*: example r is training position
# positions[storage_order(n, window)[r]] (`recsys prepare` writes it as record r). Up to
# `window` examples, storage order is the positions' own order and every epoch is one uniform
# permutation of all of them. Above it, storage order is a fixed pseudo-random permutation (the
# same for every training seed), so any `window` consecutive examples are a uniform sample of
# all; an epoch then visits the windows of consecutive examples in a seeded order and each
# window in a seeded order of its own. A reader of prepared shards thus needs only the shards of
# one or two windows at a time (its memory does not grow with the data), and a batch is still a
# uniform draw from the whole data (one window: `window` examples spread over all users).

_ROUNDS = 4  # Feistel rounds of the per-epoch permutation (4: Luby-Rackoff's minimum)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)  # odd 64-bit multipliers (splitmix64's)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_STORAGE_KEY = 0x5702A6E  # keys storage_order (with the example count), never the training seed


def shuffled(index_N: np.ndarray, num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Where each index lands in the permutation of 0..num_examples-1 for (seed, epoch): [N] int64.

    A keyed Feistel network over the smallest even-bit domain holding `num_examples` (at most
    4x larger), re-applied to indices that land outside until they land inside (cycle walking),
    so the permutation is never materialised: time and memory are O(N) whatever
    `num_examples` is. Grain's `index_shuffle` is the same idea but takes one index per Python
    call (about 2.7 us each: 22 ms for a batch of 8192).
    """
    return _permuted(index_N, num_examples, (seed, epoch))


def _permuted(index_N: np.ndarray, n: int, key: tuple[int, ...]) -> np.ndarray:
    """`shuffled`, keyed by any tuple of non-negative ints."""
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    shift, top, mask = np.uint64(half), np.uint64(64 - half), np.uint64((1 << half) - 1)
    keys = _round_keys(key)
    out = np.asarray(index_N, np.uint64).copy()
    todo = np.arange(len(out))
    x = out
    while len(todo):
        left, right = x >> shift, x & mask
        for k in keys:  # round: (L, R) -> (R, L ^ F(R)), F = top bits of a mixed R ^ key
            z = (right ^ k) * _MIX_1
            z ^= z >> np.uint64(29)
            z *= _MIX_2
            left, right = right, left ^ (z >> top)
        x = (left << shift) | right
        out[todo] = x
        outside = x >= n
        todo, x = todo[outside], x[outside]
    return out.astype(np.int64)


@functools.lru_cache(maxsize=1024)
def _round_keys(key: tuple[int, ...]) -> tuple[np.uint64, ...]:
    """The Feistel round keys of `key` (SeedSequence costs ~20 us: a batch reuses them)."""
    return tuple(np.random.SeedSequence(list(key)).generate_state(_ROUNDS, np.uint64))


@functools.lru_cache(maxsize=8)
def _window_order(count: int, seed: int, epoch: int) -> tuple[np.ndarray, int]:
    """(the window at each place [count], the place of the last window) of epoch `epoch`:
    computed once per epoch (a few elements cycle-walk a small domain many times)."""
    window_at_C = _permuted(np.arange(count), count, (seed, epoch, 0))
    window_at_C.flags.writeable = False
    return window_at_C, int(np.flatnonzero(window_at_C == count - 1)[0])


def storage_order(num_examples: int, window: int, first: int = 0,
                  count: int | None = None) -> np.ndarray:
    """Which training position (index into the positions) examples first .. first+count-1 are,
    in storage order (see above): [count] int64; all of them when count is None."""
    count = num_examples - first if count is None else count
    index = np.arange(first, first + count, dtype=np.int64)
    return index if num_examples <= window else _permuted(index, num_examples,
                                                          (_STORAGE_KEY, num_examples))


def epoch_places(within_N: np.ndarray, num_examples: int, window: int, seed: int,
                 epoch: int) -> np.ndarray:
    """The examples at places `within_N` of epoch `epoch`'s order: [N] int64.

    Up to `window` examples, `shuffled`. Above, windows of `window` consecutive examples (the
    last one shorter) in the order `shuffled` gives the window numbers for (seed, epoch, 0),
    each window's examples in the order of its own key (seed, epoch, 1, window number).
    """
    within_N = np.asarray(within_N, np.int64)
    if num_examples <= window:
        return shuffled(within_N, num_examples, seed, epoch)
    count = -(-num_examples // window)
    last = num_examples - (count - 1) * window  # the last window's examples (1 .. window)
    window_at_C, short = _window_order(count, seed, epoch)  # place -> window; the last's place
    after = short * window + last  # the first place after the short window
    place_N = np.where(within_N < short * window, within_N // window,
                       np.where(within_N < after, short, (within_N - last) // window + 1))
    offset_N = within_N - np.where(place_N <= short, place_N * window,
                                   (place_N - 1) * window + last)
    window_N = window_at_C[place_N]
    out = np.empty(len(within_N), np.int64)
    for w in np.unique(window_N).tolist():
        sel = window_N == w
        size = last if w == count - 1 else window
        out[sel] = w * window + _permuted(offset_N[sel], size, (seed, epoch, 1, w))
    return out


def example_indices(step: int, rows_R: np.ndarray, batch_size: int, num_examples: int,
                    seed: int, window: int) -> np.ndarray:
    """Which training examples (0..num_examples-1, storage order) rows `rows_R` of global batch
    `step` hold.

    Global batch s is slots s*B .. s*B+B-1 of an endless stream in which epoch e is the order
    `epoch_places` gives for (seed, e): a pure function of (seed, step), so a resumed run sees
    exactly what an uninterrupted one would have, and processes that each compute their own
    rows agree on the whole batch. Returns [R] int64.
    """
    return _by_epoch(step, rows_R, batch_size, num_examples,
                     lambda epoch, within: epoch_places(within, num_examples, window, seed,
                                                        epoch))


def _by_epoch(step: int, rows_R: np.ndarray, batch_size: int, num_examples: int, at_epoch):
    """at_epoch(epoch, places in that epoch's order) for the slots rows_R of batch `step`, one
    call per epoch the batch spans (two at an epoch boundary): [R] int64."""
    epoch_R, within_R = np.divmod(step * batch_size + np.asarray(rows_R, np.int64), num_examples)
    if len(epoch_R) == 0:
        return np.zeros(0, np.int64)
    first, last = int(epoch_R.min()), int(epoch_R.max())
    if first == last:
        return at_epoch(first, within_R)
    out = np.empty(len(within_R), np.int64)
    for epoch in range(first, last + 1):
        sel = epoch_R == epoch
        out[sel] = at_epoch(epoch, within_R[sel])
    return out


# Up to this many examples, BatchOrder keeps each epoch's whole permutation (8 bytes an example)
# and slices it: one vectorised `shuffled` call per epoch instead of one per batch, whose numpy
# overhead at small batches (0.3 ms at B = 1024) is most of building a batch.
CACHED_PERMUTATION_MAX = 1 << 24


class BatchOrder:
    """Which training positions form global batch `step` (see `example_indices`).

    window: `data.shuffle_window` (the order's window; see "the example order" above).
    """

    def __init__(self, positions: np.ndarray, batch_size: int, seed: int, window: int):
        if len(positions) == 0:
            raise ValueError("no training examples")
        positions = np.asarray(positions, np.int64)
        self.positions = positions[storage_order(len(positions), window)]  # by example
        self.batch_size = batch_size
        self.seed = seed
        self.window = window
        self._permutations: dict[int, np.ndarray] = {}  # epoch -> positions in its order

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The positions in epoch `epoch`'s order (the last two epochs kept)."""
        if epoch not in self._permutations:
            n = len(self.positions)
            self._permutations[epoch] = self.positions[
                epoch_places(np.arange(n), n, self.window, self.seed, epoch)]
            for old in [e for e in self._permutations if e < epoch - 1]:
                del self._permutations[old]
        return self._permutations[epoch]

    def at(self, step: int, process_index: int = 0, process_count: int = 1, *,
           rows: np.ndarray | None = None) -> np.ndarray:
        """Positions of this process's rows of global batch `step`: [B / process_count] int64.

        The rows are `rows` (e.g. `sharding.process_rows(mesh, batch_size)`) when given, else
        the process's contiguous slice.
        """
        if rows is None:
            per_process = self.batch_size // process_count
            rows = process_index * per_process + np.arange(per_process)
        n = len(self.positions)
        if n > CACHED_PERMUTATION_MAX:
            return self.positions[example_indices(step, rows, self.batch_size, n, self.seed,
                                                  self.window)]
        return _by_epoch(step, rows, self.batch_size, n,
                         lambda epoch, within: self._epoch_order(epoch)[within])
