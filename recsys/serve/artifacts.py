"""Loads a sealed artifacts bundle into arrays and compiled functions (no training code needed)."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np

from recsys import artifacts as bundle
from recsys import index as index_lib
from recsys import npyio
from recsys.artifacts import ArtifactError
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
    path: pathlib.Path | None = None  # the version directory read (its name is the version)


def load(path: str | pathlib.Path) -> Loaded:
    """Loads a sealed bundle: an artifacts root's current version (the pointer is read once) or
    a version directory. Every file is verified (recsys.artifacts.verify) before any is read."""
    with bundle.reading(path) as version:  # garbage collection leaves it alone meanwhile
        manifest = bundle.verify(version)
        try:
            return _read(version, manifest)
        except ArtifactError:
            raise
        except Exception as e:  # whatever a verified but unusable file raises, named
            raise ArtifactError(f"{version}: cannot read artifacts: {e}") from e


def _read(d: pathlib.Path, manifest: dict) -> Loaded:
    feats = _arrays(d / bundle.ITEM_FEATURES)
    users = _arrays(d / bundle.USERS)
    has_ranker = manifest.get("has_ranker", False)
    query_fn, query_names = _exported_with_names(d / bundle.QUERY_TOWER)
    return Loaded(
        manifest=manifest,
        items=Vocab.from_sorted(_array(d / bundle.ITEM_IDS)),
        users=Vocab.from_sorted(_array(d / bundle.USER_IDS)),
        item_vectors=_array(d / bundle.ITEM_VECTORS),
        item_genres=feats["genres"], item_year=feats["year"], item_logpop=feats["logpop"],
        item_titles=feats.get("titles"), item_release_year=feats.get("release_year"),
        user_features=users["features"], history_offsets=users["history_offsets"],
        history_items=users["history_items"], history_times=users["history_times"],
        query_fn=query_fn, query_input_names=query_names,
        query_params=_on_device(d / bundle.QUERY_PARAMS),
        ranker_fn=_exported_with_names(d / bundle.RANKER)[0] if has_ranker else None,
        ranker_params=_on_device(d / bundle.RANKER_PARAMS) if has_ranker else None,
        searcher=index_lib.load(d / bundle.INDEX_DIR), path=d)


def ranker_tables(a: Loaded) -> RankerTables:
    """What the ranker reads by row, with the item timeline of the stored (non-test) events."""
    timeline = ItemTimeline.build(a.history_items, a.history_times, len(a.item_vectors))
    return RankerTables(a.item_vectors, a.item_genres, a.item_year, a.item_logpop,
                        a.user_features, timeline)


def _array(path: pathlib.Path) -> np.ndarray:
    return npyio.load_array(path)


def _arrays(path: pathlib.Path) -> dict:
    """Every array of an .npz, read now (the file is closed on return)."""
    return npyio.load_arrays(path)


def _on_device(path: pathlib.Path) -> dict:
    """Parameters as device arrays, placed once: numpy arguments would be copied on every call
    (the query tower's item table alone is 128 MB at 1M items x 32)."""
    return {k: jax.device_put(v) for k, v in _arrays(path).items()}


def _exported_with_names(path: pathlib.Path):
    """A jitted call of a jax.export'ed fn(params, inputs) and the names of its inputs."""
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    (_, inputs), _ = jax.tree_util.tree_unflatten(exported.in_tree, exported.in_avals)
    return jax.jit(exported.call), tuple(inputs)
