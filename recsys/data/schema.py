"""What every data source returns: interactions in raw ids plus item and user side information."""

from __future__ import annotations

import dataclasses

import numpy as np


class DataError(ValueError):
    """Data that cannot be read or used (missing file, bad column, empty after filtering)."""


@dataclasses.dataclass(frozen=True)
class ItemInfo:
    """The catalogue: every item that may be recommended, with its features.

    Attributes:
      ids: [N] raw item ids (int64 or str), unique.
      genres: [N, G] bool multi-hot genre membership.
      genre_names: G names, in column order.
      year: [N] int32 release year, 0 where unknown.
      titles: [N] str titles, or None when the source has none.
    """

    ids: np.ndarray
    genres: np.ndarray
    genre_names: tuple[str, ...]
    year: np.ndarray
    titles: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class UserInfo:
    """Per-user categorical features.

    Attributes:
      ids: [U] raw user ids (int64 or str), unique.
      features: [U, F] int32 category codes in 1..cardinality-1; 0 means unknown.
      feature_names: F names.
      cardinalities: F vocabulary sizes, each counting the unknown code 0.
    """

    ids: np.ndarray
    features: np.ndarray
    feature_names: tuple[str, ...]
    cardinalities: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class RawData:
    """Interactions as a source read them (implicit feedback: every event counts).

    Attributes:
      name: dataset name for reports, e.g. "synthetic" or "ml-latest-small".
      user_ids: [E] raw user id per event.
      item_ids: [E] raw item id per event.
      timestamps: [E] int64 seconds per event. Ties keep file order.
      items: the catalogue. Events whose item is not in it are dropped by the dataset builder.
      users: user features, or None when the source has none.
    """

    name: str
    user_ids: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray
    items: ItemInfo
    users: UserInfo | None = None

    def __post_init__(self):
        n = len(self.user_ids)
        if len(self.item_ids) != n or len(self.timestamps) != n:
            raise DataError(f"{self.name}: user_ids, item_ids and timestamps differ in length "
                            f"({n}, {len(self.item_ids)}, {len(self.timestamps)})")
