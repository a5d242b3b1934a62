"""Artifacts from trained models: a versioned directory that serving loads without training code.

Layout of DIR/artifacts (written as DIR/artifacts.tmp-*, renamed when complete):
  manifest.json          format version, config, sizes, dims, created at, sha256 of every file
  item_ids.npy           [V-1] raw item ids of rows 1..V-1 (row 0 is padding)
  user_ids.npy           [U-1] raw user ids of rows 1..U-1
  item_vectors.npy       [V, D] candidate-tower vectors
  item_features.npz      genres [V, G], year [V] (bucket), release_year [V], logpop [V],
                         titles [V] (when known)
  users.npz              features [U, F], history offsets [U+1] and items (each user's events
                         in time order, without the held-out test event)
  query_tower.jax        jax.export of (params, user, history, user_feats) -> q [b, D]
  query_params.npz       its parameters, flat "path/to/param" keys
  ranker.jax             jax.export of (params, inputs) -> scores [b, n] (optional); inputs as in
                         recsys.models.ranker_inputs.input_spec (b requests, n candidates)
  ranker_params.npz
  index/                 the ScaNN (or exact) searcher over item_vectors
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil
import time

import jax
import numpy as np
from flax import nnx

from recsys import config as config_lib
from recsys import index as index_lib
from recsys.artifacts import FORMAT_VERSION, MANIFEST, sha256
from recsys.data.dataset import Dataset
from recsys.models.ranker_inputs import input_spec as ranker_input_spec


def flat_params(model: nnx.Module):
    """(graphdef, treedef, rest, {"path": array}) with numpy arrays gathered from every device."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    flat = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): _to_numpy(leaf)
            for path, leaf in leaves_with_paths}
    return graphdef, treedef, rest, flat


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def export_module(model: nnx.Module, method: str, example_inputs: dict, symbolic: dict):
    """Serialises `model.<method>(inputs)` with params as inputs (small file; params in npz).

    Args:
      example_inputs: name -> array giving dtype and shape.
      symbolic: name -> shape string for jax.export.symbolic_shape, e.g. "b, 20".
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
        k: jax.ShapeDtypeStruct(jax.export.symbolic_shape(symbolic[k], scope=scope), v.dtype)
        for k, v in example_inputs.items()}
    exported = jax.export.export(jax.jit(fn))(abstract_params, abstract_inputs)
    return exported.serialize(), flat


def write_artifacts(out_dir: pathlib.Path, *, cfg: config_lib.Config, files: dict,
                    searcher, manifest: dict) -> pathlib.Path:
    """Writes every file into a temporary sibling directory, then renames it to `out_dir`.

    Args:
      files: relative name -> bytes, np.ndarray (.npy) or dict of arrays (.npz).
      searcher: an index searcher, saved under index/.
      manifest: extra manifest fields (sizes, dims, metrics).
    """
    out_dir = pathlib.Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{int(time.time() * 1e6)}")
    tmp.mkdir(parents=True)
    try:
        for name, content in files.items():
            _write(tmp / name, content)
        searcher.save(tmp / "index")
        checksums = {str(p.relative_to(tmp)): sha256(p)
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
        full = {"format_version": FORMAT_VERSION,
                "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
                "config": config_lib.to_dict(cfg), **manifest, "checksums": checksums}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, default=_json_default))
        if out_dir.exists():
            old = out_dir.with_name(f"{out_dir.name}.old-{int(time.time() * 1e6)}")
            out_dir.rename(old)
            shutil.rmtree(old)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write(path: pathlib.Path, content) -> None:
    if isinstance(content, bytes | bytearray):
        path.write_bytes(bytes(content))
    elif isinstance(content, dict):
        np.savez(path, **content)
    else:
        np.save(path, np.asarray(content), allow_pickle=False)


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def export_artifacts(out_dir: pathlib.Path, *, cfg: config_lib.Config, ds: Dataset, two_tower,
                     item_vectors: np.ndarray, ranker=None, ranker_inputs=None,
                     manifest: dict | None = None) -> tuple[pathlib.Path, object]:
    """Exports the towers, ranker, features, histories and a fresh index; returns (dir, searcher)."""
    tables = ds.features
    history = ds.history(np.zeros(1, np.int64))  # [1, L] example for shapes only
    q_inputs = {"user": np.zeros(1, np.int32), "history": history,
                "user_feats": tables.user_features[:1]}
    q_shapes = {"user": "b", "history": f"b, {ds.history_len}",
                "user_feats": f"b, {tables.user_features.shape[1]}"}
    if cfg.model.time_features:  # request time and the user's previous event, int32 minutes
        q_inputs["time_context"], q_shapes["time_context"] = np.zeros((1, 2), np.int32), "b, 2"
    q_bytes, q_params = export_module(two_tower, "embed_query", q_inputs, q_shapes)
    files = {"query_tower.jax": q_bytes, "query_params.npz": q_params,
             "item_ids.npy": ds.items.ids, "user_ids.npy": ds.users.ids,
             "item_vectors.npy": item_vectors.astype(np.float32),
             "item_features.npz": _item_features(ds, ranker_inputs),
             "users.npz": _user_histories(ds)}
    if ranker is not None:
        spec = ranker_input_spec(item_vectors.shape[1], tables.item_genres.shape[1],
                                 tables.user_features.shape[1], ds.history_len)
        example = {k: np.zeros([1 if s == "b" else 2 if s == "n" else int(s)
                                for s in shape.split(", ")], dtype)
                   for k, (dtype, shape) in spec.items()}
        r_bytes, r_params = export_module(ranker, "__call__", example,
                                          {k: shape for k, (_, shape) in spec.items()})
        files.update({"ranker.jax": r_bytes, "ranker_params.npz": r_params})
    valid = np.ones(len(item_vectors), bool)
    valid[0] = False
    searcher = index_lib.build(item_vectors, cfg.index, valid_mask=valid)
    info = {"dataset": ds.name, "num_items": ds.num_items, "num_users": ds.num_users,
            "embed_dim": int(item_vectors.shape[1]), "history_len": ds.history_len,
            "genre_names": list(ds.genre_names), "has_ranker": ranker is not None,
            "user_feature_cardinalities": list(tables.user_cardinalities),
            "index": {"kind": cfg.index.kind, **_index_params(searcher)}, **(manifest or {})}
    return write_artifacts(out_dir, cfg=cfg, files=files, searcher=searcher, manifest=info), searcher


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


def rewrite_index(directory: pathlib.Path, item_vectors: np.ndarray, cfg: config_lib.Config):
    """Rebuilds index/ of an artifacts directory with cfg.index; rewrites the manifest atomically."""
    valid = np.ones(len(item_vectors), bool)
    valid[0] = False
    searcher = index_lib.build(item_vectors, cfg.index, valid_mask=valid)
    tmp = directory / f"index.tmp-{int(time.time() * 1e6)}"
    searcher.save(tmp)
    manifest = json.loads((directory / MANIFEST).read_text())
    old = directory / f"index.old-{int(time.time() * 1e6)}"
    (directory / "index").rename(old)
    tmp.rename(directory / "index")
    shutil.rmtree(old)
    manifest["config"]["index"] = config_lib.to_dict(cfg)["index"]
    manifest["index"] = {"kind": cfg.index.kind, **_index_params(searcher)}
    manifest["checksums"] = {k: v for k, v in manifest["checksums"].items()
                             if not k.startswith("index/")}
    for p in sorted((directory / "index").rglob("*")):
        if p.is_file():
            manifest["checksums"][str(p.relative_to(directory))] = sha256(p)
    tmp_manifest = directory / (MANIFEST + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2, default=_json_default))
    tmp_manifest.replace(directory / MANIFEST)
    return searcher
