"""Vocabularies: raw ids (int or str) to contiguous indices, with 0 reserved for unknown and padding."""

from __future__ import annotations

import numpy as np


class Vocab:
    """Sorted raw ids; raw id `ids[i]` has index i + 1 and index 0 means unknown or padding."""

    def __init__(self, ids: np.ndarray):
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iuU":
            ids = ids.astype(str)
        ids = np.unique(ids)
        self.ids = ids

    @classmethod
    def from_sorted(cls, ids: np.ndarray) -> Vocab:
        vocab = cls.__new__(cls)
        vocab.ids = np.asarray(ids)
        return vocab

    @property
    def size(self) -> int:
        """Rows a table needs: every id plus the unknown/padding row 0."""
        return len(self.ids) + 1

    @property
    def is_int(self) -> bool:
        return self.ids.dtype.kind in "iu"

    def coerce(self, raw) -> np.ndarray:
        """Converts raw ids given as str or int to this vocabulary's dtype; unconvertible ones -> None mask."""
        values = np.asarray(raw, dtype=object).reshape(-1)
        if not self.is_int:
            return np.array([str(v) for v in values], dtype=self.ids.dtype if len(values) else str)
        out = np.full(len(values), -1, dtype=np.int64)
        for i, v in enumerate(values):
            try:
                if isinstance(v, (bool, np.bool_)) or (isinstance(v, float) and not v.is_integer()):
                    continue
                out[i] = int(v)
            except (TypeError, ValueError, OverflowError):
                pass
        return out

    def lookup(self, raw) -> np.ndarray:
        """Indices of raw ids: [n] int32, 0 where the id is unknown."""
        raw = np.asarray(raw)
        if raw.dtype.kind not in "iuU" or (raw.dtype.kind in "iu") != self.is_int:
            raw = self.coerce(raw)
        if len(self.ids) == 0 or raw.size == 0:
            return np.zeros(raw.shape, np.int32)
        pos = np.searchsorted(self.ids, raw)
        pos_clipped = np.minimum(pos, len(self.ids) - 1)
        found = self.ids[pos_clipped] == raw
        return np.where(found, pos_clipped + 1, 0).astype(np.int32)

    def raw(self, indices) -> np.ndarray:
        """Raw ids of indices (index 0 is not a valid item and raises)."""
        indices = np.asarray(indices)
        if np.any(indices <= 0):
            raise ValueError("index 0 is the unknown/padding row and has no raw id")
        return self.ids[indices - 1]
