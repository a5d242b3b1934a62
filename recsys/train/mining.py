"""Index-mined hard negatives: items from a rank band of a recent snapshot of the model, per
training example, searched on a background thread while training goes on (recsys.train.negatives
turns them into the loss's negatives)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import pathlib
import threading
import time

import jax
import numpy as np

from recsys import sharding
from recsys.config import ConfigError, TrainConfig
from recsys.data.batches import event_query_inputs, item_inputs
from recsys.data.dataset import Dataset
from recsys.eval import protocol, ranking
from recsys.models import layers

KEEP_TABLES = 3  # saved tables kept: the active and the pending one, plus one for older checkpoints
BEGIN_TIMEOUT_S = 600.0  # at() waits this long for a refresh the loop has not begun yet
# Queries searched at once: their [256, V] scores stay in cache for the top-k (ml-latest-small,
# 25k queries on 2 CPU cores: 1.5 s against 2.4 s with exact_topk's default of 1024).
QUERY_BLOCK = 256

_embed_queries = layers.jitted("embed_query")
_embed_items = layers.jitted("embed_items")


def sample_band(scores_RxK, rows_RxK, known_fn, row_of_P, positive_score_P, *,
                ranks: tuple[int, int], num: int, margin: float, rng: np.random.Generator):
    """Draws `num` negatives per position from ranks [lo, hi) of its query's top-k list, without
    replacement.

    Positions share a query row (row_of_P) when they share a search (train.mine_stride); the
    band and the user's known items are filtered once per query row, the margin and the draw
    per position. Skipped: padding (-1/0 rows), items for which `known_fn` is True (the user's
    own positives) and items scoring above the position's positive minus `margin` (likely
    false negatives: the model already ranks them over what the user chose).

    Args:
      scores_RxK, rows_RxK: exact top-k (k >= hi) scores and item rows per query, descending.
      known_fn: [R, B] item rows -> [R, B] bool, True where the query's user knows the item.
      row_of_P: [P] the query row of each position.
      positive_score_P: [P] the score of each position's positive item under its query.

    Returns:
      items_PxN: int32 item rows, 0 where fewer than `num` items were left.
      log_q_P: float32 log(1/number of items left), the probability of each draw (0 if none).
    """
    lo, hi = ranks
    band_RxB, band_scores_RxB = rows_RxK[:, lo:hi], scores_RxK[:, lo:hi]
    ok_RxB = (band_RxB > 0) & ~known_fn(np.maximum(band_RxB, 0))
    ok_PxB = ok_RxB[row_of_P] & (band_scores_RxB[row_of_P] <= positive_score_P[:, None] - margin)
    # A random key per slot, invalid slots last: the `num` smallest are a uniform draw.
    keys_PxB = np.where(ok_PxB, rng.random(ok_PxB.shape), np.inf)
    if num < keys_PxB.shape[1]:  # the num smallest, then in key order: argsort's first num
        pick_PxN = np.argpartition(keys_PxB, num - 1, axis=1)[:, :num]
        order_PxN = np.argsort(np.take_along_axis(keys_PxB, pick_PxN, axis=1), axis=1)
        pick_PxN = np.take_along_axis(pick_PxN, order_PxN, axis=1)
    else:
        pick_PxN = np.argsort(keys_PxB, axis=1)[:, :num]
    items_PxN = band_RxB[row_of_P[:, None], pick_PxN]
    items_PxN = np.where(np.take_along_axis(ok_PxB, pick_PxN, axis=1), items_PxN, 0)
    left_P = ok_PxB.sum(axis=1)
    log_q_P = np.where(left_P > 0, -np.log(np.maximum(left_P, 1)), 0.0)
    return items_PxN.astype(np.int32), log_q_P.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Table:
    """One mined table: H negatives per training position, and what the loss needs beside them.

    Attributes:
      items_PxH: int32 item rows (0: no negative, masked in the loss).
      log_q_P: float32 log(1/items left in the position's band).
      vectors_VxD: the snapshot's candidate-tower vectors of every item row (row 0 padding),
        with train.mined_vectors="cached"; else None.
    """

    items_PxH: np.ndarray
    log_q_P: np.ndarray
    vectors_VxD: np.ndarray | None = None


class MinedNegatives:
    """Tables of H mined negatives for every training position, re-mined every `period` steps.

    Schedule, a pure function of the step: the refresh due at step S = k * period (k >= 1) is
    mined from the model as it is at S (before step S trains) and is used from step
    S + lag on, lag = round(train.mine_lag * period) < period. Before the first table is in use
    every entry is 0 (masked in the loss). With lag > 0 the search runs on a background thread
    while steps S .. S + lag - 1 train with the previous table; `at` waits if it is unfinished,
    so only the wall time depends on the thread, never the tables. With lag = 0 the refresh is
    synchronous, as it always was.

    Each table is saved beside the checkpoints (file named by S), so a run resumed at any step
    reads the tables an uninterrupted run used, including one begun before the checkpoint and
    not in use yet (`flush` writes it before a checkpoint is saved).

    The loop's calls (main thread), in order:
      restore(model, start)   once, before the first batch is built;
      begin(step, model)      at step `step`, before its train step is dispatched: starts the
                              refresh when one is due (a no-op otherwise; `due` says when);
      at(step, positions_B)   from any thread, to build batch `step`;
      flush()                 before saving a checkpoint;
      close()                 at the end (also on errors): finishes and saves a begun refresh.
    """

    def __init__(self, ds: Dataset, positions: np.ndarray, cfg: TrainConfig,
                 directory: pathlib.Path, *, background: bool = True):
        self.ds, self.positions, self.cfg = ds, np.asarray(positions, np.int64), cfg
        self.directory = pathlib.Path(directory)
        self.period = max(1, round(cfg.mine_every_epochs * len(positions) / cfg.batch_size))
        lag = cfg.mine_lag
        if not 0 <= lag < 1:
            raise ConfigError(f"train.mine_lag={lag!r}: must be in [0, 1) (a fraction of the "
                              "re-mining period)")
        self.lag = min(round(lag * self.period), self.period - 1)
        mode = cfg.mined_vectors
        if mode not in ("embed", "cached"):
            raise ConfigError(f"train.mined_vectors={mode!r}: must be embed or cached")
        self.cached = mode == "cached"
        self.slot_E = np.full(len(ds.seq_items), -1, np.int64)
        self.slot_E[self.positions] = np.arange(len(self.positions))
        # The user's own training items, as sorted keys user * V + item.
        v = ds.items.size
        self.known_keys = np.unique(ds.seq_users[self.positions].astype(np.int64) * v
                                    + ds.seq_items[self.positions])
        # Each run of `mine_stride` consecutive training events of a user is searched once, with
        # the query of its first event (nearby queries share most of their history).
        users_P = ds.seq_users[self.positions]
        first_P = np.searchsorted(users_P, users_P, side="left")  # positions are grouped by user
        group_P = first_P + (np.arange(len(users_P)) - first_P) // cfg.mine_stride * cfg.mine_stride
        self.queries, self.query_of_P = np.unique(group_P, return_inverse=True)
        self.query_users = users_P[self.queries].astype(np.int64)  # one user per query row
        # Inputs of every refresh, built once: the query rows' histories and the catalogue.
        self._query_inputs = event_query_inputs(ds, self.positions[self.queries])
        self._item_inputs = item_inputs(ds.features, np.arange(len(ds.features.item_year)))
        self.dim: int | None = None  # D of the item vectors, known after restore or a refresh
        self.seconds: dict[int, float] = {}  # refresh step -> seconds its search took
        self.wait_seconds = 0.0  # seconds `at` waited for an unfinished refresh
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mining")
                      if background and self.lag > 0 else None)
        self._cond = threading.Condition()
        self._tables: dict[int, concurrent.futures.Future] = {}  # refresh step -> Table
        h = cfg.mined_negatives
        self._install(0, Table(np.zeros((len(self.positions), h), np.int32),
                               np.zeros(len(self.positions), np.float32)))

    # ---- the loop's calls ------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """True at the steps whose model a refresh is mined from (S = k * period, k >= 1)."""
        return step > 0 and step % self.period == 0

    def begin(self, step: int, model) -> None:
        """Starts the refresh due at `step` from `model` (the state before step `step` trains).

        Only dispatches the towers on the device (so the state may be donated right after) and
        hands the rest to the background thread; a no-op when no refresh is due at `step` or it
        was begun already.
        """
        if not self.due(step):
            return
        with self._cond:
            if step in self._tables:
                return
        vectors = self._dispatch(model)
        if self._pool is None:  # synchronous: an error raises here, in the loop
            future = concurrent.futures.Future()
            future.set_result(self._mine(vectors, step))
        else:
            future = self._pool.submit(self._mine, vectors, step)
        with self._cond:
            self._tables[step] = future
            # Older than the table in use from this step's predecessor: never read again.
            for old in [s for s in self._tables if s < step - self.period]:
                del self._tables[old]
            self._cond.notify_all()

    def at(self, step: int, positions_B: np.ndarray):
        """The mined negatives of batch `step` for these positions (thread-safe).

        Returns:
          items_BxH: int32 item rows (0: no negative, masked in the loss).
          log_q_B: float32 log(1/items left in the row's band), the probability of each draw
            (recsys.train.negatives.mined_log_q turns it into the configured correction).
          vectors_BxHxD: float32 cached candidate vectors of items_BxH (train.mined_vectors=
            "cached"; zeros before the first table), or None (embedded in the step).
        """
        table = self._table(self.refresh_in_use(step))
        slots_B = self.slot_E[np.asarray(positions_B, np.int64)]
        items_BxH = table.items_PxH[slots_B]
        if not self.cached:
            return items_BxH, table.log_q_P[slots_B], None
        if table.vectors_VxD is not None:
            vectors_BxHxD = table.vectors_VxD[items_BxH]
        elif self.dim is None:
            raise RuntimeError("MinedNegatives.at: call restore() first (it learns the vectors' "
                               "width for the cached mined vectors)")
        else:
            vectors_BxHxD = np.zeros((*items_BxH.shape, self.dim), np.float32)
        return items_BxH, table.log_q_P[slots_B], vectors_BxHxD

    def refresh_in_use(self, step: int) -> int:
        """The refresh step S whose table batch `step` uses (0: none yet, all entries 0)."""
        k = (step - self.lag) // self.period
        return k * self.period if k >= 1 else 0

    def restore(self, model, start: int) -> None:
        """Loads the tables a run that never stopped would hold at `start`: the one in use and
        one begun before `start` but not in use yet. A lost table is re-mined with `model`
        (the state at `start`: then the run differs from an uninterrupted one)."""
        self.dim = int(jax.eval_shape(lambda: _embed_items(model, {
            k: v[:1] for k, v in self._item_inputs.items()})).shape[-1])
        in_use = self.refresh_in_use(start)
        for s in (in_use, in_use + self.period):
            if s == 0 or s >= start:  # nothing mined yet, or this run begins it itself
                continue
            table = self._load(s)
            if table is None:
                table = self._mine(self._dispatch(model), s)
            self._install(s, table)

    def flush(self) -> None:
        """Waits until every begun refresh is finished and saved; re-raises a refresh's error."""
        with self._cond:
            futures = list(self._tables.values())
        for future in futures:
            future.result()

    def close(self) -> None:
        """Finishes and saves a begun refresh, then stops the background thread."""
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def install(self, step: int, table: Table) -> None:
        """Makes `table` the refresh of `step` (used from step + lag), e.g. a known table in
        tests."""
        self._install(step, table)

    # ---- mining ----------------------------------------------------------------------------

    def _dispatch(self, model) -> tuple[list, list]:
        """The snapshot's query and item vectors, dispatched (not waited for) in chunks of
        protocol.CHUNK rows, whole on this process's first device (the one collective here, in
        the caller's thread so that every process runs it in the same order)."""

        def chunks(fn, inputs):
            n = len(next(iter(inputs.values())))
            out = []
            for start in range(0, n, protocol.CHUNK):  # as protocol.query_vectors: same numbers
                part = {k: v[start:start + protocol.CHUNK] for k, v in inputs.items()}
                size = len(next(iter(part.values())))
                if n > protocol.CHUNK and size < protocol.CHUNK:
                    part = {k: np.concatenate([v, np.repeat(v[-1:], protocol.CHUNK - size, axis=0)])
                            for k, v in part.items()}
                out.append((sharding.local_copy(fn(model, part)), size))
            return out

        return chunks(_embed_queries, self._query_inputs), chunks(_embed_items, self._item_inputs)

    def _mine(self, vectors: tuple[list, list], step: int) -> Table:
        """Searches, samples and saves the table of the refresh at `step` (any thread)."""
        t0 = time.perf_counter()
        q_RxD, items_VxD = (np.concatenate([np.asarray(x)[:size] for x, size in part])
                            .astype(np.float32) for part in vectors)
        self.dim = items_VxD.shape[1]
        table = self._search(q_RxD, items_VxD, step)
        self._save(step, table)
        self.seconds[step] = time.perf_counter() - t0
        return table

    def _search(self, q_RxD: np.ndarray, items_VxD: np.ndarray, step: int) -> Table:
        """Exact top-hi of each query row, then a seeded draw from each position's band."""
        ds, cfg = self.ds, self.cfg
        hi = min(cfg.mine_ranks[1], ds.num_items)
        scores_RxK, rows_RxK = ranking.exact_topk(q_RxD, items_VxD, hi, query_block=QUERY_BLOCK)
        pos_P = ds.seq_items[self.positions]
        positive_score_P = np.einsum("pd,pd->p", q_RxD[self.query_of_P], items_VxD[pos_P])
        v = ds.items.size

        def known(rows_RxB):
            keys = self.query_users[:, None] * v + rows_RxB
            at = np.minimum(np.searchsorted(self.known_keys, keys), len(self.known_keys) - 1)
            return self.known_keys[at] == keys

        items_PxH, log_q_P = sample_band(
            scores_RxK, rows_RxK, known, self.query_of_P, positive_score_P,
            ranks=(min(cfg.mine_ranks[0], hi - 1), hi), num=cfg.mined_negatives,
            margin=cfg.mine_margin, rng=np.random.default_rng([cfg.seed, step, 2]))
        return Table(items_PxH, log_q_P, items_VxD if self.cached else None)

    # ---- the tables ------------------------------------------------------------------------

    def _install(self, step: int, table: Table) -> None:
        future = concurrent.futures.Future()
        future.set_result(table)
        with self._cond:
            self._tables[step] = future
            self._cond.notify_all()

    def _table(self, step: int) -> Table:
        """The table of the refresh at `step`, waiting until it is begun and finished."""
        with self._cond:
            if not self._cond.wait_for(lambda: step in self._tables, timeout=BEGIN_TIMEOUT_S):
                raise RuntimeError(f"the mined table of step {step} was never begun: the loop must "
                                   f"call MinedNegatives.begin({step}, model) at step {step}")
            future = self._tables[step]
        if future.done():
            return future.result()
        t0 = time.perf_counter()  # the search is still running: the batch waits for it
        table = future.result()
        self.wait_seconds += time.perf_counter() - t0
        return table

    def _path(self, step: int) -> pathlib.Path:
        return self.directory / f"mined-{step}.npz"

    def _load(self, step: int) -> Table | None:
        path = self._path(step)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as saved:
            if self.cached and "vectors" not in saved:
                return None  # saved by an embed run: re-mined
            return Table(saved["items"], saved["log_q"],
                         saved["vectors"] if self.cached else None)

    def _save(self, step: int, table: Table) -> None:
        """Process 0 writes (every process mines the same table); keeps the latest few."""
        if jax.process_index() != 0:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"mined-{step}.tmp.npz"
        arrays = {"items": table.items_PxH, "log_q": table.log_q_P}
        if table.vectors_VxD is not None:
            arrays["vectors"] = table.vectors_VxD
        np.savez(tmp, **arrays)
        tmp.replace(self._path(step))
        saved = sorted((int(p.name[6:-4]), p) for p in self.directory.glob("mined-*.npz")
                       if not p.name.endswith(".tmp.npz"))
        for _, old in saved[:-KEEP_TABLES]:
            old.unlink(missing_ok=True)
