"""Index-mined hard negatives: items from a rank band of the current model, per training example
(recsys.train.negatives turns them into the loss's negatives)."""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from recsys.config import TrainConfig
from recsys.data.dataset import Dataset
from recsys.eval import protocol, ranking


def sample_band(scores_PxK, rows_PxK, positive_score_P, known_P_fn, *, ranks: tuple[int, int],
                num: int, margin: float, rng: np.random.Generator):
    """Draws `num` negatives per row from ranks [lo, hi) of a top-k list, without replacement.

    Skipped: padding (-1/0 rows), items for which `known_P_fn(rows_PxB)` is True (the user's own
    positives) and items scoring above the positive's score minus `margin` (likely false
    negatives: the model already ranks them over what the user chose).

    Args:
      scores_PxK, rows_PxK: exact top-k (k >= hi) scores and item rows per row, descending.
      positive_score_P: the score of each row's positive item.
      known_P_fn: [P, B] item rows -> [P, B] bool, True where the row's user knows the item.

    Returns:
      items_PxN: int32 item rows, 0 where fewer than `num` items were left.
      log_q_P: float32 log(1/number of items left), the probability of each draw (0 if none).
    """
    lo, hi = ranks
    band_PxB, band_scores_PxB = rows_PxK[:, lo:hi], scores_PxK[:, lo:hi]
    ok_PxB = (band_PxB > 0) & (band_scores_PxB <= positive_score_P[:, None] - margin)
    ok_PxB &= ~known_P_fn(np.maximum(band_PxB, 0))
    # A random key per slot, invalid slots last: the first `num` are a uniform draw.
    keys_PxB = np.where(ok_PxB, rng.random(ok_PxB.shape), np.inf)
    pick_PxN = np.argsort(keys_PxB, axis=1)[:, :num]
    items_PxN = np.take_along_axis(band_PxB, pick_PxN, axis=1)
    items_PxN = np.where(np.take_along_axis(ok_PxB, pick_PxN, axis=1), items_PxN, 0)
    left_P = ok_PxB.sum(axis=1)
    log_q_P = np.where(left_P > 0, -np.log(np.maximum(left_P, 1)), 0.0)
    return items_PxN.astype(np.int32), log_q_P.astype(np.float32)


class MinedNegatives:
    """A table of H mined negatives for every training position, refreshed every `period` steps.

    Before the first refresh every entry is 0 (masked in the loss). Each refresh searches the
    current item vectors exactly (`ranking.exact_topk`) with each position's query vector and
    is saved beside the checkpoints, so a resumed run reads the table an uninterrupted run
    would have used.
    """

    def __init__(self, ds: Dataset, positions: np.ndarray, cfg: TrainConfig,
                 directory: pathlib.Path):
        self.ds, self.positions, self.cfg = ds, np.asarray(positions, np.int64), cfg
        self.directory = pathlib.Path(directory)
        self.period = max(1, round(cfg.mine_every_epochs * len(positions) / cfg.batch_size))
        self.slot_E = np.full(len(ds.seq_items), -1, np.int64)
        self.slot_E[self.positions] = np.arange(len(self.positions))
        # The user's own training items, as sorted keys user * V + item.
        v = ds.items.size
        self.known_keys = np.unique(ds.seq_users[self.positions].astype(np.int64) * v
                                    + ds.seq_items[self.positions])
        self.items_PxH = np.zeros((len(self.positions), cfg.mined_negatives), np.int32)
        self.log_q_P = np.zeros(len(self.positions), np.float32)
        # Each run of `mine_stride` consecutive training events of a user is searched once, with
        # the query of its first event (nearby queries share most of their history).
        users_P = ds.seq_users[self.positions]
        first_P = np.searchsorted(users_P, users_P, side="left")  # positions are grouped by user
        group_P = first_P + (np.arange(len(users_P)) - first_P) // cfg.mine_stride * cfg.mine_stride
        self.queries, self.query_of_P = np.unique(group_P, return_inverse=True)

    def due(self, step: int) -> bool:
        return step > 0 and step % self.period == 0

    def refresh(self, model, step: int) -> None:
        """Mines the whole table with `model` (deterministic mode) and saves it as of `step`."""
        ds, cfg = self.ds, self.cfg
        q_RxD = protocol.query_vectors(model, ds, self.positions[self.queries])
        items_VxD = protocol.item_vectors(model, ds.features)
        hi = min(cfg.mine_ranks[1], ds.num_items)
        scores_RxK, rows_RxK = ranking.exact_topk(q_RxD, items_VxD, hi)
        scores_PxK, rows_PxK = scores_RxK[self.query_of_P], rows_RxK[self.query_of_P]
        pos_P = ds.seq_items[self.positions]
        positive_score_P = np.einsum("pd,pd->p", q_RxD[self.query_of_P], items_VxD[pos_P])
        users_P = ds.seq_users[self.positions].astype(np.int64)

        def known(rows_PxB):
            keys = users_P[:, None] * ds.items.size + rows_PxB
            at = np.minimum(np.searchsorted(self.known_keys, keys), len(self.known_keys) - 1)
            return self.known_keys[at] == keys

        self.items_PxH, self.log_q_P = sample_band(
            scores_PxK, rows_PxK, positive_score_P, known,
            ranks=(min(cfg.mine_ranks[0], hi - 1), hi), num=cfg.mined_negatives,
            margin=cfg.mine_margin, rng=np.random.default_rng([cfg.seed, step, 2]))
        self._save(step)

    def restore(self, model, step: int) -> None:
        """The table a run that never stopped would hold at `step` (re-mined if it was lost)."""
        last = (step // self.period) * self.period
        if last in (0, step):  # nothing mined yet, or the loop mines at this very step
            return
        path = self._path(last)
        if path.is_file():
            with np.load(path, allow_pickle=False) as saved:
                self.items_PxH, self.log_q_P = saved["items"], saved["log_q"]
        else:
            self.refresh(model, last)

    def at(self, positions_B: np.ndarray):
        """The mined items of the events at these positions, and each row's band log q.

        Returns:
          items_BxH: int32 item rows (0: no negative, masked in the loss).
          log_q_B: float32 log(1/items left in the row's band), the probability of each draw
            (recsys.train.negatives.mined_log_q turns it into the configured correction).
        """
        slots_B = self.slot_E[np.asarray(positions_B, np.int64)]
        return self.items_PxH[slots_B], self.log_q_P[slots_B]

    def _path(self, step: int) -> pathlib.Path:
        return self.directory / f"mined-{step}.npz"

    def _save(self, step: int) -> None:
        """Process 0 writes (every process mines the same table); keeps the latest two."""
        if jax.process_index() != 0:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"mined-{step}.tmp.npz"
        np.savez(tmp, items=self.items_PxH, log_q=self.log_q_P)
        tmp.replace(self._path(step))
        saved = sorted((int(p.name[6:-4]), p) for p in self.directory.glob("mined-*.npz")
                       if not p.name.endswith(".tmp.npz"))
        for _, old in saved[:-2]:
            old.unlink(missing_ok=True)
