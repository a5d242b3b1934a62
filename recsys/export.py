"""Artifacts from trained models: sealed, versioned bundles that serving loads without training code.

Layout of DIR/artifacts, the root (recsys.artifacts owns every name and the seal):
  current                    symlink -> versions/<id>: the published version, switched atomically
  versions/<id>/             one sealed bundle per export or index rebuild (older ones kept:
                             keep_versions; removed when neither current nor being read)
    manifest.json            format version, recsys version, config, sizes, dims, created at, and
                             the size and sha256 of every other file (nothing unlisted is allowed)
    item_ids.npy             [V-1] raw item ids of rows 1..V-1 (row 0 is padding)
    user_ids.npy             [U-1] raw user ids of rows 1..U-1
    item_vectors.npy         [V, D] candidate-tower vectors, written WRITE_ROWS rows at a time
                             through a memory map (never whole in memory) and hashed by streaming
    item_features.npz        genres [V, G], year [V] (bucket), release_year [V], logpop [V],
                             titles [V] (when known)
    users.npz                features [U, F], history offsets [U+1] and items (each user's events
                             in time order, without the held-out test event)
    query_tower.jax          jax.export of (params, inputs) -> q [b, D]; inputs as in
                             recsys.features.query_input_spec
    query_params.npz         its parameters, flat "path/to/param" keys
    ranker.jax               jax.export of (params, inputs) -> scores [b, n] (optional); inputs as in
                             recsys.models.ranker_inputs.input_spec (b requests, n candidates)
    ranker_params.npz
    index/                   the ScaNN (or exact) searcher over item_vectors (recsys.index)
  versions/<id>.tmp/         a version being written (never pointed at)
Every .npy / .npz holds plain arrays (read with allow_pickle=False); nothing is pickled.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil

import jax
import numpy as np
from flax import nnx

from recsys import artifacts, features
from recsys import config as config_lib
from recsys import index as index_lib
from recsys.data.batches import item_inputs
from recsys.data.dataset import Dataset, FeatureTables
from recsys.eval import protocol
from recsys.index import tuning
from recsys.models import layers
from recsys.models.ranker_inputs import input_spec as ranker_input_spec
from recsys.progress import Progress
from recsys.sharding import to_host

# Rows of item vectors written at once (16 MiB at D = 64). A multiple of protocol.CHUNK, so the
# blocks CandidateVectors computes line up with the evaluation's (bit-for-bit the same vectors).
WRITE_ROWS = 16 * protocol.CHUNK

_embed_items = layers.jitted("embed_items")


def flat_params(model: nnx.Module):
    """(graphdef, treedef, rest, {"path": array}) with numpy arrays gathered from every device."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    flat = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): to_host(leaf)
            for path, leaf in leaves_with_paths}
    return graphdef, treedef, rest, flat


def export_module(model: nnx.Module, method: str, spec: dict):
    """Serialises `model.<method>(inputs)` with params as inputs (small file; params in npz).

    Args:
      spec: name -> (dtype, symbolic shape) of the inputs dict (see recsys.features).

    Returns:
      (serialized bytes, {"path/to/param": array}).
    """
    model.eval()
    graphdef, treedef, rest, flat = flat_params(model)
    keys = list(flat)

    def fn(params: dict, inputs: dict):
        state = jax.tree.unflatten(treedef, [params[k] for k in keys])
        return getattr(nnx.merge(graphdef, state, rest), method)(inputs)

    scope = jax.export.SymbolicScope()
    abstract_params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
    abstract_inputs = {
        k: jax.ShapeDtypeStruct(jax.export.symbolic_shape(shape, scope=scope), dtype)
        for k, (dtype, shape) in spec.items()}
    exported = jax.export.export(jax.jit(fn))(abstract_params, abstract_inputs)
    return exported.serialize(), flat


class CandidateVectors:
    """The candidate tower's vectors of every item row, computed when a row range is read: [V, D].

    Give it to `export_artifacts` as `item_vectors` and the catalogue's vectors are computed
    and written block by block: memory holds one block and the tower's activations of `batch`
    rows, never [V, D]. Rows are embedded in jitted calls of `batch` rows, the last one padded
    when V > batch (one compile), as recsys.eval.protocol.item_vectors does: with the default
    batch the vectors are bit-for-bit the evaluation's. With another batch they agree to float
    rounding only (XLA's CPU matmul picks its kernel by the batch shape: ~3e-7 on unit vectors).
    """

    def __init__(self, model, tables: FeatureTables, batch: int = protocol.CHUNK):
        if batch < 1:
            raise ValueError(f"CandidateVectors batch={batch}: must be >= 1")
        model.eval()
        self._model, self._tables, self._batch = model, tables, int(batch)
        self._num_rows = len(tables.item_year)
        self.shape = (self._num_rows, int(self[0:1].shape[1]))

    def __getitem__(self, rows: slice) -> np.ndarray:
        """[len(rows), D] float32 vectors of the rows in the slice (step 1)."""
        start, stop, step = rows.indices(self._num_rows)
        if step != 1:
            raise ValueError(f"CandidateVectors reads row ranges (step 1), got step {step}")
        if start >= stop:
            return np.empty((0, self.shape[1]), np.float32)
        out = []
        for lo in range(start, stop, self._batch):
            rows_B = np.arange(lo, min(lo + self._batch, stop))
            inputs = item_inputs(self._tables, rows_B)
            if self._num_rows > self._batch and len(rows_B) < self._batch:
                inputs = {k: np.concatenate([v, np.repeat(v[-1:], self._batch - len(rows_B), 0)])
                          for k, v in inputs.items()}
            out.append(to_host(_embed_items(self._model, inputs))[:len(rows_B)])
        return np.concatenate(out).astype(np.float32)


def write_vectors(path: pathlib.Path, item_vectors, rows: int) -> np.ndarray:
    """Writes `item_vectors` [V, D] into the .npy file `path`, `rows` rows at a time.

    Args:
      item_vectors: an array (or memory map), or CandidateVectors: anything with .shape [V, D]
        whose row ranges [a:b] read as arrays.

    Returns:
      The file's vectors, memory-mapped read-only: [V, D] float32.
    """
    num_rows, dim = item_vectors.shape
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(num_rows, dim))
    with Progress("item vectors", num_rows, unit="items") as progress:
        for start in range(0, num_rows, rows):
            stop = min(start + rows, num_rows)
            block = np.asarray(item_vectors[start:stop], np.float32)
            if block.shape != (stop - start, dim):
                raise ValueError(f"item_vectors[{start}:{stop}] has shape {block.shape}, expected "
                                 f"{(stop - start, dim)} (item_vectors.shape {(num_rows, dim)})")
            out[start:stop] = block
            progress.update(stop - start)
    out.flush()
    vectors = out.view(np.ndarray)
    vectors.flags.writeable = False
    return vectors


def _write_files(directory: pathlib.Path, files: dict) -> None:
    """files: relative name -> bytes, np.ndarray (.npy) or dict of arrays (.npz)."""
    for name, content in files.items():
        path = directory / name
        if isinstance(content, bytes | bytearray):
            path.write_bytes(bytes(content))
        elif isinstance(content, dict):
            np.savez(path, **content)
        else:
            np.save(path, np.asarray(content), allow_pickle=False)


def export_artifacts(out_dir: pathlib.Path, *, cfg: config_lib.Config, ds: Dataset, two_tower,
                     item_vectors, ranker=None, ranker_inputs=None,
                     manifest: dict | None = None,
                     tuning_queries: np.ndarray | None = None) -> tuple[pathlib.Path, object]:
    """Publishes the towers, ranker, features, histories and a fresh index as a new version of
    the artifacts root `out_dir`; returns (the version directory, its searcher).

    item_vectors: [V, D] item vectors, read WRITE_ROWS rows at a time into the version's
      item_vectors.npy: an array, or `CandidateVectors(two_tower, ds.features)` to compute them
      block by block (nothing [V, D] in memory). The index is built from that file, memory-mapped.
    tuning_queries: [Q, D] real query vectors (the query tower on validation events) the index
      is tuned on to index.target_recall (see recsys.index.tuning); None leaves it untuned.

    Everything is written into the version's staging directory; a failure at any point (a
    block of vectors, the index, a file) removes it, and no version is published.
    """
    with Progress("export", 5 if ranker is not None else 4, unit="parts") as progress:
        progress.set_postfix(part="query tower")
        tables = ds.features
        dim = item_vectors.shape[1]
        q_spec = features.query_input_spec(ds.history_len, tables.user_features.shape[1],
                                           cfg.model.time_features)
        q_bytes, q_params = export_module(two_tower, "embed_query", q_spec)
        files = {artifacts.QUERY_TOWER: q_bytes, artifacts.QUERY_PARAMS: q_params,
                 artifacts.ITEM_IDS: ds.items.ids, artifacts.USER_IDS: ds.users.ids,
                 artifacts.ITEM_FEATURES: _item_features(ds, ranker_inputs),
                 artifacts.USERS: _user_histories(ds)}
        progress.update()
        if ranker is not None:
            progress.set_postfix(part="ranker")
            r_spec = ranker_input_spec(dim, tables.item_genres.shape[1],
                                       tables.user_features.shape[1], ds.history_len)
            r_bytes, r_params = export_module(ranker, "__call__", r_spec)
            files.update({artifacts.RANKER: r_bytes, artifacts.RANKER_PARAMS: r_params})
            progress.update()
        info = {"config": config_lib.to_dict(cfg), "dataset": ds.name, "num_items": ds.num_items,
                "num_users": ds.num_users, "embed_dim": int(dim),
                "history_len": ds.history_len, "genre_names": list(ds.genre_names),
                "has_ranker": ranker is not None,
                "user_feature_cardinalities": list(tables.user_cardinalities),
                **(manifest or {})}
        built = {}

        def write(staging: pathlib.Path) -> dict:
            progress.set_postfix(part="item vectors")
            vectors_VxD = write_vectors(staging / artifacts.ITEM_VECTORS, item_vectors,
                                        WRITE_ROWS)
            progress.update()
            progress.set_postfix(part="index")
            built["searcher"], index_info = _build_index(vectors_VxD, cfg, tuning_queries)
            built["searcher"].save(staging / artifacts.INDEX_DIR)
            progress.update()
            progress.set_postfix(part="files")
            _write_files(staging, files)
            return {**info, "index": index_info}

        version = artifacts.publish(out_dir, write, keep_versions=cfg.export.keep_versions)
        progress.update()
    return version, built["searcher"]


def _build_index(item_vectors: np.ndarray, cfg: config_lib.Config,
                 tuning_queries: np.ndarray | None = None) -> tuple[object, dict]:
    """The searcher cfg.index asks for over item_vectors [V, D] (row 0, padding, left out),
    tuned to index.target_recall on `tuning_queries` when given; and its manifest entry."""
    valid = features.valid_rows(len(item_vectors))
    ic = cfg.index
    with Progress("index build", 1, unit="indexes") as progress:
        progress.set_postfix(kind=ic.kind, items=len(item_vectors) - 1)
        searcher = index_lib.build(item_vectors, ic, valid_mask=valid)
        progress.update()
    tuned = None
    if ic.target_recall > 0 and tuning_queries is not None and len(tuning_queries) >= 2:
        with Progress("index tuning", 1, unit="searches") as progress:
            searcher, tuned = tuning.tune(searcher, item_vectors, valid, tuning_queries,
                                          ic.target_recall, ic.recall_k)
            progress.set_postfix(recall=f"{tuned.recall:.3f}", fallback=tuned.fallback)
            progress.update()
        if tuned.fallback:
            logging.getLogger("recsys").warning(
                "index: no setting reached recall@%d %.3f on the validation queries; serving "
                "exact search (index/fallback)", ic.recall_k, ic.target_recall)
    info = {"kind": ic.kind, **_index_params(searcher)}
    if isinstance(searcher, index_lib.ShardedSearcher):
        info["num_shards"] = len(searcher.shards)
    if tuned is not None:
        info["tuning"] = tuned.to_dict()
    return searcher, info


def _index_params(searcher) -> dict:
    params = getattr(searcher, "params", None)
    return params.to_dict() if params is not None else {}


def _item_features(ds: Dataset, ranker_inputs) -> dict:
    out = {"genres": ds.features.item_genres, "year": ds.features.item_year,
           "release_year": ds.features.item_release_year}
    if ranker_inputs is not None:
        out["logpop"] = ranker_inputs.item_logpop
    else:
        counts = ds.item_counts(ds.train_positions("train+val"))
        out["logpop"] = np.log1p(counts).astype(np.float32)
    if ds.item_titles is not None:
        out["titles"] = ds.item_titles.astype(str)
    return out


def _user_histories(ds: Dataset) -> dict:
    """Each user's events in time order without the held-out test event (the last one)."""
    starts, ends = ds.offsets[1:-1], ds.offsets[2:] - 1
    counts = np.concatenate([[0], ends - starts])
    offsets = np.concatenate([[0], np.cumsum(counts)])  # row 0 (unknown user) is empty
    keep = np.ones(len(ds.seq_items), bool)
    keep[ends] = False
    return {"features": ds.features.user_features, "history_offsets": offsets,
            "history_items": ds.seq_items[keep], "history_times": ds.seq_times[keep]}


def rewrite_index(version: pathlib.Path, item_vectors: np.ndarray, cfg: config_lib.Config,
                  tuning_queries: np.ndarray | None = None):
    """Publishes a copy of a version with its index rebuilt by cfg.index.

    Call it inside `artifacts.reading(...)`, after `artifacts.verify(version)`: the copy is sealed
    anew, so it must start from checked files. `version` is left as it is (readers may hold
    it); the new version becomes current in its root. Files other than the index are
    hard-linked (copied where links are not possible).

    Returns:
      (the new version directory, its searcher).
    """
    version = pathlib.Path(version)
    root = artifacts.root_of(version)
    old = artifacts.read_manifest(version)
    searcher, index_info = _build_index(item_vectors, cfg, tuning_queries)
    fields = {**old, "config": {**old["config"], "index": config_lib.to_dict(cfg)["index"]},
              "index": index_info}
    kept = [name for name in old["checksums"]
            if not name.startswith(artifacts.INDEX_DIR + "/")]

    def write(staging: pathlib.Path) -> dict:
        for name in kept:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(version / name, staging / name, follow_symlinks=False)
            except OSError:  # a file system without hard links
                shutil.copyfile(version / name, staging / name, follow_symlinks=False)
        searcher.save(staging / artifacts.INDEX_DIR)
        return fields

    return artifacts.publish(root, write, keep_versions=cfg.export.keep_versions), searcher
