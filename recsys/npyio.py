"""Reading .npy and .npz files safely from several threads of one process.

numpy parses every .npy header with `ast.literal_eval`, and CPython 3.11's AST constructor is
not thread-safe: two threads parsing at once can fail with "SystemError: AST constructor
recursion depth mismatch" (CPython issue gh-106905). Loads of artifacts and indexes can run
in several threads (a server reloading while another loads), so every read goes through one
process-wide lock. Reads are rare and short next to what is done with the arrays.
"""

from __future__ import annotations

import pathlib
import threading

import numpy as np

_LOCK = threading.Lock()


def load_array(path: str | pathlib.Path) -> np.ndarray:
    """The array of a .npy file (never a pickle)."""
    with _LOCK:
        return np.load(path, allow_pickle=False)


def load_arrays(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every array of a .npz file, read whole (never a pickle)."""
    with _LOCK, np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
