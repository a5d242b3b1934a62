"""Loads an artifacts directory into arrays and compiled functions (no training code needed)."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np

from recsys import index as index_lib
from recsys.artifacts import ArtifactError, verify
from recsys.data.vocab import Vocab
from recsys.models.ranker_inputs import ItemTimeline, RankerTables


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
    item_release_year: np.ndarray | None  # [V] release year, 0 unknown (None: older artifacts)
    user_features: np.ndarray  # [U, F]
    history_offsets: np.ndarray  # [U + 1]
    history_items: np.ndarray  # [E]
    history_times: np.ndarray  # [E] seconds
    query_fn: object  # (params, inputs) -> q [b, D]
    query_input_names: tuple[str, ...]  # the keys of the inputs dict query_fn takes
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
        query_fn, query_names = _exported_with_names(directory / "query_tower.jax")
        return Loaded(
            manifest=manifest,
            items=Vocab.from_sorted(np.load(directory / "item_ids.npy")),
            users=Vocab.from_sorted(np.load(directory / "user_ids.npy")),
            item_vectors=np.load(directory / "item_vectors.npy"),
            item_genres=feats["genres"], item_year=feats["year"], item_logpop=feats["logpop"],
            item_titles=feats["titles"] if "titles" in feats.files else None,
            item_release_year=(feats["release_year"] if "release_year" in feats.files
                               else None),
            user_features=users["features"], history_offsets=users["history_offsets"],
            history_items=users["history_items"], history_times=users["history_times"],
            query_fn=query_fn, query_input_names=query_names,
            query_params=_on_device(directory / "query_params.npz"),
            ranker_fn=_exported(directory / "ranker.jax") if has_ranker else None,
            ranker_params=_on_device(directory / "ranker_params.npz") if has_ranker else None,
            searcher=index_lib.load(directory / "index"))
    except (OSError, KeyError, ValueError) as e:
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{directory}: cannot read artifacts: {e}") from None


def ranker_tables(a: Loaded) -> RankerTables:
    """What the ranker reads by row, with the item timeline of the stored (non-test) events."""
    timeline = ItemTimeline.build(a.history_items, a.history_times, len(a.item_vectors))
    return RankerTables(a.item_vectors, a.item_genres, a.item_year, a.item_logpop,
                        a.user_features, timeline)


def _manifest_only(directory: pathlib.Path) -> dict:
    import json
    path = directory / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{directory}: manifest.json is missing (was the export interrupted?)")
    return json.loads(path.read_text())


def _on_device(path: pathlib.Path) -> dict:
    """Parameters as device arrays, placed once: numpy arguments would be copied on every call
    (the query tower's item table alone is 128 MB at 1M items x 32)."""
    return {k: jax.device_put(v) for k, v in np.load(path).items()}


def _exported(path: pathlib.Path):
    return _exported_with_names(path)[0]


def _exported_with_names(path: pathlib.Path):
    """A jitted call of a jax.export'ed fn(params, inputs) and the names of its inputs."""
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    (_, inputs), _ = jax.tree_util.tree_unflatten(exported.in_tree, exported.in_avals)
    return jax.jit(exported.call), tuple(inputs)
