"""From raw events to indexed per-user sequences, the leave-last-out split, histories and exclusions."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from recsys.config import DataConfig
from recsys.data.schema import DataError, RawData
from recsys.data.vocab import Vocab
from recsys.features import year_bucket


@dataclasses.dataclass(frozen=True)
class FeatureTables:
    """Side features by vocabulary index; row 0 is the unknown/padding row.

    Attributes:
      item_genres: [V, G] float32 multi-hot genres.
      item_year: [V] int32 year bucket (0 unknown).
      user_features: [U, F] int32 category codes (0 unknown).
      user_cardinalities: F vocabulary sizes of the user features.
      item_release_year: [V] int32 release year itself (0 unknown): serving's exact year filters.
    """

    item_genres: np.ndarray
    item_year: np.ndarray
    user_features: np.ndarray
    user_cardinalities: tuple[int, ...]
    item_release_year: np.ndarray


@dataclasses.dataclass(frozen=True)
class Dataset:
    """All kept events as per-user sequences in time order (CSR), with vocabularies and features.

    Events of user index u (1..U) are positions offsets[u]:offsets[u+1] of the seq_* arrays.
    Per user, the last event is the test target, the one before it the validation target.
    """

    name: str
    users: Vocab
    items: Vocab
    offsets: np.ndarray  # [users.size + 1] int64
    seq_users: np.ndarray  # [E] int32
    seq_items: np.ndarray  # [E] int32
    seq_times: np.ndarray  # [E] int64
    features: FeatureTables
    genre_names: tuple[str, ...]
    item_titles: np.ndarray | None  # [V] str, row 0 empty
    history_len: int
    unknown_item_events: int = 0  # events dropped because their item is not in the catalogue

    @property
    def num_items(self) -> int:
        return self.items.size - 1

    @property
    def num_users(self) -> int:
        return self.users.size - 1

    def eval_positions(self, split: str) -> np.ndarray:
        """Positions of each user's validation ("val") or test ("test") event: [U] int64."""
        last = self.offsets[2:] - 1
        if split == "test":
            return last
        if split == "val":
            return last - 1
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")

    def train_positions(self, trained_on: str, max_per_user: int = 0) -> np.ndarray:
        """Positions used as training targets: [M] int64 (train events, plus validation ones)."""
        end = self.offsets[2:] - (2 if trained_on == "train" else 1)
        start = self.offsets[1:-1]
        if max_per_user > 0:
            start = np.maximum(start, end - max_per_user)
        return _ranges(start, end)

    def history(self, positions: np.ndarray, length: int | None = None) -> np.ndarray:
        """The `length` items strictly before each position, oldest first, 0-padded on the left: [B, L]."""
        length = length or self.history_len
        positions = np.asarray(positions, np.int64)
        starts = self.offsets[self.seq_users[positions]]
        idx_BxL = positions[:, None] - length + np.arange(length)[None, :]
        valid_BxL = idx_BxL >= starts[:, None]
        return np.where(valid_BxL, self.seq_items[np.maximum(idx_BxL, 0)], 0).astype(np.int32)

    def previous_times(self, positions: np.ndarray) -> np.ndarray:
        """Time of the user's event just before each position, or -1 for a first event: [B] int64."""
        positions = np.asarray(positions, np.int64)
        first = positions == self.offsets[self.seq_users[positions]]
        return np.where(first, -1, self.seq_times[np.maximum(positions - 1, 0)])

    def earlier_items(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CSR (offsets [B+1], items) of every item strictly before each position (to exclude)."""
        positions = np.asarray(positions, np.int64)
        starts = self.offsets[self.seq_users[positions]]
        counts = positions - starts
        csr_offsets = np.concatenate([[0], np.cumsum(counts)])
        return csr_offsets, self.seq_items[_ranges(starts, positions)]

    def item_counts(self, positions: np.ndarray) -> np.ndarray:
        """How often each item row is a target among `positions`: [V] int64."""
        return np.bincount(self.seq_items[positions], minlength=self.items.size)


def _ranges(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for each pair, vectorised."""
    counts = np.maximum(end - start, 0)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first = np.repeat(start - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return first + np.arange(total, dtype=np.int64)


def build(raw: RawData, cfg: DataConfig) -> Dataset:
    """Indexes a RawData: drops unknown items and short users, sorts each user's events by time."""
    items = Vocab(raw.items.ids)
    if len(items.ids) != len(raw.items.ids):
        raise DataError(f"{raw.name}: the item catalogue has duplicate ids")
    item_idx = items.lookup(raw.item_ids)
    keep = item_idx > 0
    unknown = len(keep) - int(keep.sum())
    if unknown:
        first = np.asarray(raw.item_ids)[np.argmin(keep)].item()
        what = (f"{raw.name}: {unknown} of {len(keep)} events ({unknown / len(keep):.2%}) name "
                f"items missing from the catalogue (first: item {first!r})")
        if cfg.unknown_items == "fail":
            raise DataError(f"{what}; data.unknown_items=fail refuses them")
        logging.getLogger(__name__).warning("%s; dropped (data.unknown_items=fail refuses them)",
                                            what)
    user_raw = np.asarray(raw.user_ids)[keep]
    counts_by_raw = Vocab(user_raw)
    user_idx_all = counts_by_raw.lookup(user_raw)
    per_user = np.bincount(user_idx_all, minlength=counts_by_raw.size)
    users = Vocab.from_sorted(counts_by_raw.ids[per_user[1:] >= cfg.min_user_events])
    user_idx = users.lookup(user_raw)
    ok = user_idx > 0
    if not ok.any():
        raise DataError(f"{raw.name}: no user has at least data.min_user_events="
                        f"{cfg.min_user_events} events on catalogue items "
                        f"({len(raw.user_ids)} events read, {int(keep.sum())} on known items)")
    user_idx, item_idx = user_idx[ok], item_idx[keep][ok]
    times = np.asarray(raw.timestamps, np.int64)[keep][ok]
    order = np.lexsort((times, user_idx))  # stable: ties keep file order
    seq_users, seq_items, seq_times = user_idx[order], item_idx[order], times[order]
    offsets = np.zeros(users.size + 1, np.int64)
    offsets[1:] = np.cumsum(np.bincount(seq_users, minlength=users.size))
    return Dataset(
        name=raw.name, users=users, items=items, offsets=offsets,
        seq_users=seq_users.astype(np.int32), seq_items=seq_items.astype(np.int32),
        seq_times=seq_times, features=_feature_tables(raw, items, users),
        genre_names=tuple(raw.items.genre_names), item_titles=_titles(raw, items),
        history_len=cfg.history_len, unknown_item_events=unknown)


def _feature_tables(raw: RawData, items: Vocab, users: Vocab) -> FeatureTables:
    rows = items.lookup(raw.items.ids)
    genres = np.zeros((items.size, raw.items.genres.shape[1]), np.float32)
    genres[rows] = raw.items.genres
    release_year = np.zeros(items.size, np.int32)
    release_year[rows] = np.maximum(raw.items.year, 0)
    year = year_bucket(release_year)
    if raw.users is None:
        return FeatureTables(genres, year, np.zeros((users.size, 0), np.int32), (), release_year)
    user_feats = np.zeros((users.size, raw.users.features.shape[1]), np.int32)
    urows = users.lookup(raw.users.ids)
    known = urows > 0
    user_feats[urows[known]] = raw.users.features[known]
    return FeatureTables(genres, year, user_feats, tuple(raw.users.cardinalities), release_year)


def _titles(raw: RawData, items: Vocab) -> np.ndarray | None:
    if raw.items.titles is None:
        return None
    titles = np.full(items.size, "", dtype=object)
    titles[items.lookup(raw.items.ids)] = raw.items.titles
    return titles
