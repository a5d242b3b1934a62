"""Loads an artifacts directory into arrays and compiled functions (no training code needed)."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np

from recsys import index as index_lib
from recsys.artifacts import ArtifactError, verify
from recsys.data.vocab import Vocab


@dataclasses.dataclass
class Loaded:
    manifest: dict
    items: Vocab
    users: Vocab
    item_vectors: np.ndarray  # [V, D]
    item_genres: np.ndarray  # [V, G]
    item_year: np.ndarray  # [V]
    item_logpop: np.ndarray  # [V]
    item_titles: np.ndarray | None  # [V] str
    user_features: np.ndarray  # [U, F]
    history_offsets: np.ndarray  # [U + 1]
    history_items: np.ndarray  # [E]
    query_fn: object  # (params, inputs) -> q [b, D]
    query_params: dict
    ranker_fn: object | None  # (params, inputs) -> scores [b, n]
    ranker_params: dict | None
    searcher: object


def load(directory: str | pathlib.Path, check: bool = True) -> Loaded:
    """Verifies checksums (when `check`) and loads every file of an artifacts directory."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artifacts directory not found: {directory}")
    manifest = verify(directory) if check else _manifest_only(directory)
    try:
        feats = np.load(directory / "item_features.npz")
        users = np.load(directory / "users.npz")
        has_ranker = manifest.get("has_ranker", False)
        return Loaded(
            manifest=manifest,
            items=Vocab.from_sorted(np.load(directory / "item_ids.npy")),
            users=Vocab.from_sorted(np.load(directory / "user_ids.npy")),
            item_vectors=np.load(directory / "item_vectors.npy"),
            item_genres=feats["genres"], item_year=feats["year"], item_logpop=feats["logpop"],
            item_titles=feats["titles"] if "titles" in feats.files else None,
            user_features=users["features"], history_offsets=users["history_offsets"],
            history_items=users["history_items"],
            query_fn=_exported(directory / "query_tower.jax"),
            query_params=dict(np.load(directory / "query_params.npz")),
            ranker_fn=_exported(directory / "ranker.jax") if has_ranker else None,
            ranker_params=dict(np.load(directory / "ranker_params.npz")) if has_ranker else None,
            searcher=index_lib.load(directory / "index"))
    except (OSError, KeyError, ValueError) as e:
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{directory}: cannot read artifacts: {e}") from None


def _manifest_only(directory: pathlib.Path) -> dict:
    import json
    path = directory / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{directory}: manifest.json is missing (was the export interrupted?)")
    return json.loads(path.read_text())


def _exported(path: pathlib.Path):
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return jax.jit(exported.call)
