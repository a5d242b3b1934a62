"""Vocabularies: raw ids (int or str) to contiguous indices, with 0 reserved for unknown and padding.

The id rule, one for the data pipeline, the export and serving alike (`Vocab.lookup` applies it):

- an id is its exact raw value: an int, or a str;
- an int and its canonical ASCII decimal string name the same id (`str(int(s)) == s`: "42",
  "-7"), so an int-keyed vocabulary finds "42" and a str-keyed one finds 42;
- nothing else is normalised: " 1 ", "+1", "01", "1_0", "１" (full-width) name no int id, and
  bools, floats, bytes, None and containers are never ids. They are unknown (index 0), never
  mapped to a near miss.
"""

from __future__ import annotations

import numpy as np

_INT64 = np.iinfo(np.int64)


def canonical_int(text: str) -> int | None:
    """The int whose canonical ASCII decimal form is exactly `text` ("-7", "42"), else None."""
    # 20 characters hold every int64 with its sign; longer text is no int64 id (and int() of a
    # very long str is slow or refused).
    if not (0 < len(text) <= 20 and text.isascii()):
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if str(value) == text else None


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

    def key(self, value) -> int | str | None:
        """`value` in this vocabulary's key space under the id rule (module docstring), or None
        when it can name no id of this vocabulary."""
        if isinstance(value, (bool, np.bool_)):
            return None
        if isinstance(value, (int, np.integer)):
            value = int(value)
            if not self.is_int:
                return str(value)
            return value if _INT64.min <= value <= _INT64.max else None
        if isinstance(value, str):
            if self.is_int:
                return canonical_int(value)
            # numpy str arrays cannot hold trailing NULs, so no stored id ends with one.
            return None if value.endswith("\0") else str(value)
        return None

    def lookup(self, raw) -> np.ndarray:
        """Indices of raw ids under the id rule: int32 of raw's shape, 0 where the id is unknown."""
        kind = raw.dtype.kind if isinstance(raw, np.ndarray) else ""
        if kind == "i" or (kind == "U" and not self.is_int):  # vectorised: no per-id rule needed
            return self._search(raw if self.is_int or kind == "U" else raw.astype(str))
        values = np.asarray(raw, dtype=object) if not isinstance(raw, np.ndarray) else raw
        shape = values.shape
        keys = [self.key(v) for v in values.reshape(-1).tolist()]
        known = np.array([k is not None for k in keys], bool)
        out = np.zeros(len(keys), np.int32)
        if known.any():
            dtype = np.int64 if self.is_int else str
            out[known] = self._search(np.array([k for k in keys if k is not None], dtype))
        return out.reshape(shape)

    def raw(self, indices) -> np.ndarray:
        """Raw ids of indices (index 0 is not a valid item and raises)."""
        indices = np.asarray(indices)
        if np.any(indices <= 0):
            raise ValueError("index 0 is the unknown/padding row and has no raw id")
        return self.ids[indices - 1]

    def _search(self, keys: np.ndarray) -> np.ndarray:
        """Indices of keys already in this vocabulary's kind (int64-range ints, or str)."""
        if len(self.ids) == 0 or keys.size == 0:
            return np.zeros(keys.shape, np.int32)
        pos = np.minimum(np.searchsorted(self.ids, keys), len(self.ids) - 1)
        return np.where(self.ids[pos] == keys, pos + 1, 0).astype(np.int32)
