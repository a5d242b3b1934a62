"""Maximum-inner-product top-k over item vectors (exact numpy or ScaNN), with save and load."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import stat

import numpy as np
import scann
from google.protobuf import text_format
from scann.scann_ops import scann_assets_pb2

from recsys import npyio
from recsys.config import IndexConfig
from recsys.index.params import ScannParams, derive_params

# Directory layout written by `save`. The descriptor is written last, so a directory without it
# is an incomplete write and fails to load.
DESCRIPTOR_FILE = "index.json"
ROWS_FILE = "rows.npy"  # [M] int64: original row number of each indexed vector
ITEMS_FILE = "items.npy"  # exact: [M, D] float32 indexed vectors
SCANN_DIR = "scann"  # scann: ScaNN's own artifacts, serialized with relative asset paths
SCANN_CONFIG = "scann_config.pb"  # in SCANN_DIR, read by ScaNN itself
SCANN_ASSETS = "scann_assets.pbtxt"  # in SCANN_DIR: the asset files, by plain name
FORMAT_VERSION = 1

_QUERY_BLOCK = 256  # queries scored at once by ExactSearcher
_ITEM_CHUNK = 16384  # items scored at once by ExactSearcher (256 x 16384 scores = 16 MiB)


class IndexLoadError(ValueError):
    """An index directory that is missing, incomplete or corrupt; the message names the file."""


class ExactSearcher:
    """Exact top-k by inner product: BLAS matmul + argpartition, chunked over items.

    Memory per call is bounded by `_QUERY_BLOCK x item_chunk` scores, whatever N is. Given a
    memory map (np.load(..., mmap_mode="r")), it keeps a view of it and reads item_chunk rows at
    a time (pages the OS can drop), so ground truth at 1e7 rows needs no in-memory copy.
    """

    kind = "exact"
    params = None

    def __init__(self, item_vectors: np.ndarray, valid_mask: np.ndarray | None = None, *,
                 item_chunk: int = _ITEM_CHUNK):
        """Indexes `item_vectors` [N, D]; rows where `valid_mask` [N] is False are never returned."""
        items_NxD = _as_items(item_vectors)
        self.num_rows, self.dim = items_NxD.shape
        self.rows_M = _valid_rows(self.num_rows, valid_mask)
        self.items_MxD = _indexed(items_NxD, self.rows_M)
        self.item_chunk = int(item_chunk)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product; see `_finish` for shapes, order and padding."""
        q_QxD, single = _as_queries(queries, self.dim)
        _check_k(k)
        kk = min(k, len(self.rows_M))
        scores_QxK = np.empty((len(q_QxD), kk), np.float32)
        local_QxK = np.empty((len(q_QxD), kk), np.int64)
        for start in range(0, len(q_QxD), _QUERY_BLOCK):
            block = slice(start, start + _QUERY_BLOCK)
            scores_QxK[block], local_QxK[block] = self._top_k(q_QxD[block], kk)
        return _finish(scores_QxK, local_QxK, self.rows_M, k, single)

    def _top_k(self, q_BxD: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        best_s_BxK = np.full((len(q_BxD), kk), -np.inf, np.float32)
        best_i_BxK = np.full((len(q_BxD), kk), -1, np.int64)
        for start in range(0, len(self.items_MxD), self.item_chunk):
            s_BxC = q_BxD @ self.items_MxD[start:start + self.item_chunk].T
            if start == 0:
                new_s, new_i = s_BxC, np.broadcast_to(np.arange(s_BxC.shape[1]), s_BxC.shape)
            else:
                # Only scores above each query's current k-th best can enter its top-k; after
                # the first chunk these are few, which skips most of argpartition's work.
                new_s, new_i = _above(s_BxC, best_s_BxK.min(axis=1), start)
            best_s_BxK, best_i_BxK = _keep_top(np.concatenate([best_s_BxK, new_s], axis=1),
                                               np.concatenate([best_i_BxK, new_i], axis=1), kk)
        # Descending score; ties broken by ascending row so results are deterministic.
        order_BxK = np.lexsort((best_i_BxK, -best_s_BxK), axis=-1)
        return (np.take_along_axis(best_s_BxK, order_BxK, axis=1),
                np.take_along_axis(best_i_BxK, order_BxK, axis=1))

    def save(self, directory: str | pathlib.Path) -> None:
        """Writes rows, vectors and the descriptor into `directory` (created if needed)."""
        directory = _start_save(directory)
        np.save(directory / ITEMS_FILE, self.items_MxD)
        np.save(directory / ROWS_FILE, self.rows_M)
        _write_descriptor(directory, self, extra={"items_file": ITEMS_FILE})

    @classmethod
    def _restore(cls, items_MxD: np.ndarray, rows_M: np.ndarray, num_rows: int) -> ExactSearcher:
        searcher = cls.__new__(cls)
        searcher.num_rows, searcher.dim = num_rows, items_MxD.shape[1]
        searcher.rows_M, searcher.items_MxD = rows_M, items_MxD
        searcher.item_chunk = _ITEM_CHUNK
        return searcher


class ScannSearcher:
    """Approximate top-k by inner product with ScaNN (tree + asymmetric hashing, or brute force)."""

    kind = "scann"

    def __init__(self, item_vectors: np.ndarray, params: ScannParams,
                 valid_mask: np.ndarray | None = None):
        """Builds a ScaNN index over the valid rows of `item_vectors` [N, D] (mask [N] bool).

        `item_vectors` may be a memory map. ScaNN copies the rows it indexes into its own
        memory once (ScannInterface::Initialize makes a std::vector of them, which it keeps
        for the exact reorder) and reads them from the array it is given without a copy of its
        own (float32, C order); contiguous valid rows are passed as a view, so the peak is one
        in-memory copy of the indexed rows plus ScaNN's codes, not two or three.
        """
        items_NxD = _as_items(item_vectors)
        self.num_rows, self.dim = items_NxD.shape
        self.rows_M = _valid_rows(self.num_rows, valid_mask)
        if len(self.rows_M) == 0:
            raise ValueError(f"valid_mask leaves no rows of the {self.num_rows} to index")
        items_MxD = _indexed(items_NxD, self.rows_M)
        self.params = params
        # num_neighbors=10 is only ScaNN's default; every search passes its own k.
        builder = scann.scann_ops_pybind.builder(items_MxD, 10, "dot_product")
        if params.mode == "brute_force":
            builder = builder.score_brute_force()
        else:
            builder = builder.tree(
                num_leaves=params.num_leaves,
                num_leaves_to_search=params.leaves_to_search,
                training_sample_size=params.training_sample_size,
            ).score_ah(
                params.dims_per_block,
                anisotropic_quantization_threshold=params.anisotropic_threshold,
            ).reorder(params.reorder)
        self._scann = builder.build()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k rows by inner product; see `_finish` for shapes, order and padding."""
        q_QxD, single = _as_queries(queries, self.dim)
        _check_k(k)
        kk = min(k, len(self.rows_M))
        # ScaNN returns at most `reorder` results, so re-score at least k candidates.
        tree = self.params.mode == "tree_ah"
        pre_reorder = max(self.params.reorder, kk) if tree else -1  # -1: ScaNN's default
        leaves = self.params.leaves_to_search if tree else -1
        if single:  # ScaNN's single-query call skips batching overhead (~5 us of ~40)
            local_K, scores_K = self._scann.search(q_QxD[0], kk, pre_reorder, leaves)
            local_QxK, scores_QxK = local_K[None], scores_K[None]
        else:
            local_QxK, scores_QxK = self._scann.search_batched(q_QxD, kk, pre_reorder, leaves)
        return _finish(scores_QxK, local_QxK, self.rows_M, k, single)

    def with_query_params(self, leaves_to_search: int, reorder: int) -> ScannSearcher:
        """The same built index searched with other query-time settings (shares the index)."""
        if self.params.mode != "tree_ah":
            raise ValueError("query-time settings apply to a tree_ah index only")
        params = dataclasses.replace(self.params, leaves_to_search=leaves_to_search,
                                     reorder=reorder)
        return ScannSearcher._restore(self._scann, params, self.rows_M, self.num_rows, self.dim)

    def save(self, directory: str | pathlib.Path) -> None:
        """Writes ScaNN's artifacts, the row mapping and the descriptor into `directory`."""
        directory = _start_save(directory)
        (directory / SCANN_DIR).mkdir(exist_ok=True)
        # Relative asset paths: the directory is written under a temporary name and renamed.
        self._scann.serialize(str(directory / SCANN_DIR), relative_path=True)
        np.save(directory / ROWS_FILE, self.rows_M)
        _write_descriptor(directory, self, extra={"scann_dir": SCANN_DIR})

    @classmethod
    def _restore(cls, scann_searcher, params: ScannParams, rows_M: np.ndarray, num_rows: int,
                 dim: int) -> ScannSearcher:
        searcher = cls.__new__(cls)
        searcher.num_rows, searcher.dim = num_rows, dim
        searcher.rows_M, searcher.params, searcher._scann = rows_M, params, scann_searcher
        return searcher


Searcher = ExactSearcher | ScannSearcher


def build(item_vectors: np.ndarray, cfg: IndexConfig,
          valid_mask: np.ndarray | None = None) -> Searcher:
    """Builds the searcher named by `cfg.kind` over `item_vectors` [N, D] (valid_mask [N] bool)."""
    if cfg.kind == "exact":
        return ExactSearcher(item_vectors, valid_mask)
    if cfg.kind == "scann" and cfg.num_shards > 1:
        from recsys.index.sharded import ShardedSearcher
        return ShardedSearcher.build(item_vectors, cfg, valid_mask)
    if cfg.kind == "scann":
        items_NxD = _as_items(item_vectors)
        num_valid = len(_valid_rows(len(items_NxD), valid_mask))
        return ScannSearcher(items_NxD, derive_params(num_valid, items_NxD.shape[1], cfg),
                             valid_mask)
    raise ValueError(f"index.kind={cfg.kind!r}: must be one of scann, exact")


def load(directory: str | pathlib.Path) -> Searcher:
    """Rebuilds the searcher saved in `directory`; raises IndexLoadError naming what is wrong.

    Only this directory's own files are read, by the names `save` writes (never a path from the
    descriptor or ScaNN's asset list that is absolute or leaves the directory), no symlink is
    followed, and ScaNN's optional pickle of document ids is refused rather than unpickled.
    """
    directory = pathlib.Path(directory)
    _check_entry(directory, "index directory", is_dir=True)
    desc = _read_descriptor(directory)
    try:
        kind, num_rows, dim = desc["kind"], int(desc["num_rows"]), int(desc["dim"])
        _check_own_name(directory, desc, "rows_file", ROWS_FILE)
        if kind == "sharded":
            from recsys.index.sharded import load_shards
            return load_shards(directory, desc)
        rows_M = _read_npy(directory / ROWS_FILE, np.int64, 1)
        if kind == "exact":
            _check_own_name(directory, desc, "items_file", ITEMS_FILE)
            items_MxD = _read_npy(directory / ITEMS_FILE, np.float32, 2)
            _check_count(directory / ITEMS_FILE, len(items_MxD), len(rows_M))
            return ExactSearcher._restore(items_MxD, rows_M, num_rows)
        if kind == "scann":
            params = ScannParams.from_dict(desc["params"])
            _check_own_name(directory, desc, "scann_dir", SCANN_DIR)
            scann_searcher = _load_scann(directory / SCANN_DIR)
            _check_count(directory / SCANN_DIR, scann_searcher.size(), len(rows_M))
            return ScannSearcher._restore(scann_searcher, params, rows_M, num_rows, dim)
    except IndexLoadError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise IndexLoadError(f"{directory / DESCRIPTOR_FILE}: bad descriptor ({e!r})") from e
    raise IndexLoadError(f"{directory / DESCRIPTOR_FILE}: unknown index kind {kind!r}")


def _as_items(item_vectors: np.ndarray) -> np.ndarray:
    items_NxD = np.ascontiguousarray(item_vectors, dtype=np.float32)
    if items_NxD.ndim != 2 or items_NxD.shape[1] == 0:
        raise ValueError(f"item_vectors must be [N, D] with D > 0, got shape {items_NxD.shape}")
    return items_NxD


def _indexed(items_NxD: np.ndarray, rows_M: np.ndarray) -> np.ndarray:
    """The rows to index: a view when they are one contiguous range (every row but the padding
    row 0, or one shard's range), so a memory-mapped table is not copied; a copy otherwise."""
    if len(rows_M) and rows_M[-1] - rows_M[0] + 1 == len(rows_M):
        return items_NxD[rows_M[0]:rows_M[-1] + 1]
    return np.ascontiguousarray(items_NxD[rows_M])


def _valid_rows(num_rows: int, valid_mask: np.ndarray | None) -> np.ndarray:
    if valid_mask is None:
        return np.arange(num_rows, dtype=np.int64)
    mask_N = np.asarray(valid_mask)
    if mask_N.dtype != np.bool_ or mask_N.shape != (num_rows,):
        raise ValueError(f"valid_mask must be bool [{num_rows}] (one per item row), "
                         f"got {mask_N.dtype} {mask_N.shape}")
    return np.flatnonzero(mask_N).astype(np.int64)


def _as_queries(queries: np.ndarray, dim: int) -> tuple[np.ndarray, bool]:
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim not in (1, 2):
        raise ValueError(f"queries must be [D] or [Q, D], got shape {q.shape}")
    if q.shape[-1] != dim:
        raise ValueError(f"query dim {q.shape[-1]} does not match index dim {dim} "
                         f"(queries shape {q.shape})")
    return (q[None], True) if q.ndim == 1 else (q, False)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _keep_top(s_BxC: np.ndarray, i_BxC: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    if s_BxC.shape[1] <= kk:
        return s_BxC, i_BxC
    part_BxK = np.argpartition(-s_BxC, kk - 1, axis=1)[:, :kk]
    return np.take_along_axis(s_BxC, part_BxK, axis=1), np.take_along_axis(i_BxC, part_BxK, axis=1)


def _above(s_BxC: np.ndarray, t_B: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores above each row's threshold, left-packed into [B, H] (-inf / -1 padded)."""
    b_H, c_H = np.nonzero(s_BxC > t_B[:, None])
    counts_B = np.bincount(b_H, minlength=len(s_BxC))
    slot_H = np.arange(len(b_H)) - np.repeat(np.cumsum(counts_B) - counts_B, counts_B)
    width = int(counts_B.max(initial=0))
    new_s_BxH = np.full((len(s_BxC), width), -np.inf, np.float32)
    new_i_BxH = np.full((len(s_BxC), width), -1, np.int64)
    new_s_BxH[b_H, slot_H] = s_BxC[b_H, c_H]
    new_i_BxH[b_H, slot_H] = c_H + offset
    return new_s_BxH, new_i_BxH


def _finish(scores_QxK: np.ndarray, local_QxK: np.ndarray, rows_M: np.ndarray, k: int,
            single: bool) -> tuple[np.ndarray, np.ndarray]:
    """Maps index positions to original rows and pads to k columns.

    Returns:
      scores [Q, k] float32 and rows [Q, k] int64 (or [k] each for a single [D] query), sorted
      by descending score. Slots with no result (k above the valid rows, or ScaNN finding fewer)
      hold row -1 and score -inf.
    """
    scores_QxK = np.asarray(scores_QxK, np.float32)
    local_QxK = np.asarray(local_QxK, np.int64)
    # ScaNN pads short result lists with NaN scores; ExactSearcher leaves -1 where it found none.
    missing_QxK = np.isnan(scores_QxK) | (local_QxK < 0)
    rows_QxK = np.where(missing_QxK, -1, rows_M[np.maximum(local_QxK, 0)])
    scores_QxK = np.where(missing_QxK, -np.inf, scores_QxK).astype(np.float32)
    pad = k - scores_QxK.shape[1]
    if pad > 0:
        scores_QxK = np.pad(scores_QxK, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows_QxK = np.pad(rows_QxK, ((0, 0), (0, pad)), constant_values=-1)
    return (scores_QxK[0], rows_QxK[0]) if single else (scores_QxK, rows_QxK)


def _start_save(directory: str | pathlib.Path) -> pathlib.Path:
    """Creates `directory` and removes any old descriptor, so a failed save cannot load."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / DESCRIPTOR_FILE).unlink(missing_ok=True)
    return directory


def _write_descriptor(directory: pathlib.Path, searcher: Searcher, extra: dict) -> None:
    desc = {
        "format": FORMAT_VERSION,
        "kind": searcher.kind,
        "num_rows": searcher.num_rows,
        "dim": searcher.dim,
        "num_indexed": len(searcher.rows_M),
        "rows_file": ROWS_FILE,
        "params": None if searcher.params is None else searcher.params.to_dict(),
        **extra,
    }
    (directory / DESCRIPTOR_FILE).write_text(json.dumps(desc, indent=2, sort_keys=True))


def _read_descriptor(directory: pathlib.Path) -> dict:
    path = directory / DESCRIPTOR_FILE
    _check_entry(path, "index descriptor")
    try:
        desc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexLoadError(f"index descriptor unreadable: {path} ({e})") from e
    if not isinstance(desc, dict) or desc.get("format") != FORMAT_VERSION:
        raise IndexLoadError(f"{path}: expected an object with format {FORMAT_VERSION}")
    return desc


def _check_entry(path: pathlib.Path, what: str, *, is_dir: bool = False) -> None:
    """`path` exists as a regular file (or directory) itself, not through a symlink."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise IndexLoadError(f"{what} not found: {path} (incomplete or not an index)") from None
    if stat.S_ISLNK(mode):
        raise IndexLoadError(f"{what} is a symlink: {path} (an index is read only from itself)")
    if not (stat.S_ISDIR(mode) if is_dir else stat.S_ISREG(mode)):
        raise IndexLoadError(f"{what} is not a {'directory' if is_dir else 'regular file'}: {path}")


def _check_own_name(directory: pathlib.Path, desc: dict, key: str, name: str) -> None:
    """The descriptor names each file for the reader's information only: it must be ours."""
    if desc.get(key) != name:
        raise IndexLoadError(f"{directory / DESCRIPTOR_FILE}: {key} {desc.get(key)!r} is not "
                             f"{name!r} (an index reads only its own files, inside its directory)")


def _read_npy(path: pathlib.Path, dtype: type, ndim: int) -> np.ndarray:
    _check_entry(path, "index file")
    try:
        array = npyio.load_array(path)
    except (OSError, ValueError, EOFError) as e:
        raise IndexLoadError(f"index file unreadable: {path} ({e})") from e
    if array.dtype != dtype or array.ndim != ndim:
        raise IndexLoadError(f"{path}: expected {ndim}-d {np.dtype(dtype)}, "
                             f"got {array.ndim}-d {array.dtype}")
    return array


def _check_count(path: pathlib.Path, found: int, expected: int) -> None:
    if found != expected:
        raise IndexLoadError(f"{path} holds {found} vectors but {ROWS_FILE} maps {expected}")


def _load_scann(scann_dir: pathlib.Path):
    """ScaNN's searcher from its files in `scann_dir` and nowhere else.

    Not `scann_ops_pybind.load_searcher`: that unpickles a `scann_docids.pkl` if one is present
    and reads asset paths as written. Here every asset must be a plain file name in `scann_dir`;
    ScaNN is handed their absolute paths, and any other file there is refused.
    """
    _check_entry(scann_dir, "index directory", is_dir=True)
    assets_file = scann_dir / SCANN_ASSETS
    for name in (SCANN_CONFIG, SCANN_ASSETS):
        _check_entry(scann_dir / name, "index file")
    try:
        assets = text_format.Parse(assets_file.read_text(), scann_assets_pb2.ScannAssets())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as e:
        raise IndexLoadError(f"{assets_file} unreadable: {e}") from e
    names = set()
    for asset in assets.assets:
        name = asset.asset_path
        if pathlib.PurePath(name).is_absolute():
            raise IndexLoadError(f"{assets_file} names absolute path {name}: an index reads only "
                                 "files inside its directory (re-save it with recsys.index)")
        if not name or pathlib.PurePath(name).name != name or name in (".", ".."):
            raise IndexLoadError(f"{assets_file} names {name!r}, not a file of {scann_dir}")
        _check_entry(scann_dir / name, "index file")
        asset.asset_path = os.path.join(os.path.abspath(scann_dir), name)
        names.add(name)
    for name in sorted(set(os.listdir(scann_dir)) - names - {SCANN_CONFIG, SCANN_ASSETS}):
        raise IndexLoadError(f"{scann_dir / name}: not a file recsys's ScaNN index writes "
                             "(ScaNN would unpickle a scann_docids.pkl); refusing to load")
    pybind = scann.scann_ops_pybind
    try:
        return pybind.ScannSearcher(pybind.scann_pybind.ScannNumpy(
            str(scann_dir), text_format.MessageToString(assets)), None)
    except (RuntimeError, ValueError) as e:
        raise IndexLoadError(f"ScaNN could not load {scann_dir}: {e}") from e
