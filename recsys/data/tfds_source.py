"""Writes RawData as a TensorFlow-free TFDS dataset (array_record) and reads it back.

The dataset `recsys_interactions` holds one example per event (user_id and item_id as
strings, timestamp int64) in event order, in a single "train" split. Item and user side
information lives beside the records in `side_info.npz` inside the dataset's version
directory (written into the same temporary directory, so the dataset appears complete or
not at all). Nothing here imports TensorFlow or touches the network.

    path = prepare(movielens.read("ml-1m"), "/data/tfds")  # once
    raw = read("/data/tfds")                               # data.source=tfds, data.path=...

The builder class must be imported in the reading process (this module does that);
`tfds.data_source("recsys_interactions", data_dir=...)` cannot find it otherwise.

Stock `movielens/*` TFDS datasets (needs network access and TensorFlow, see docs/data.md):
`import tensorflow_datasets.structured.movielens` before `tfds.load("movielens/1m-ratings")`
(the builder is lazily registered), then convert the numpy examples to RawData yourself.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from recsys.data.schema import DataError, ItemInfo, RawData, UserInfo

NAME = "recsys_interactions"
SIDE_INFO = "side_info.npz"
_READ_CHUNK = 65_536  # records decoded per __getitems__ call


class RecsysInteractions(tfds.core.GeneratorBasedBuilder):
    """Events of one RawData; `raw` is only needed to generate, never to read."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Events with string ids; side info in side_info.npz.",
    }

    def __init__(self, *, raw: RawData | None = None, **kwargs):
        self._raw = raw
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs() wants a package directory.
        features = tfds.features.FeaturesDict({
            "user_id": tfds.features.Text(),
            "item_id": tfds.features.Text(),
            "timestamp": tfds.features.Scalar(np.int64),
        })
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True,
                                     description="recsys events (implicit feedback)")

    def _split_generators(self, dl_manager):
        if self._raw is None:
            raise DataError(f"{NAME} is written by recsys.data.tfds_source.prepare(raw, "
                            f"data_dir); there is nothing to download")
        # self.data_dir is the temporary directory renamed on success.
        _write_side_info(self._raw, pathlib.Path(self.data_dir) / SIDE_INFO)
        return {"train": self._generate_examples(self._raw)}

    def _generate_examples(self, raw: RawData):
        users = raw.user_ids.astype(str).tolist()
        items = raw.item_ids.astype(str).tolist()
        for k, (u, i, t) in enumerate(zip(users, items, raw.timestamps.tolist())):
            yield k, {"user_id": u, "item_id": i, "timestamp": t}


def prepare(raw: RawData, data_dir: str | pathlib.Path) -> pathlib.Path:
    """Writes `raw` as the `recsys_interactions` dataset under `data_dir`, replacing it.

    Returns:
      The dataset's version directory (data_dir/recsys_interactions/1.0.0).
    """
    data_dir = pathlib.Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    builder = RecsysInteractions(raw=raw, data_dir=str(data_dir), file_format="array_record")
    # FORCE_REDOWNLOAD regenerates an existing version instead of refusing to overwrite it.
    config = tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD, try_download_gcs=False)
    with tempfile.TemporaryDirectory() as downloads:  # nothing is downloaded; keep no clutter
        builder.download_and_prepare(download_dir=downloads, download_config=config)
    return pathlib.Path(builder.data_dir)


def read(data_dir: str | pathlib.Path, name: str = NAME) -> RawData:
    """Reads a dataset written by `prepare` back into RawData (ids in their original dtype).

    Raises:
      DataError: naming the data_dir, or the dataset directory that is missing or incomplete.
    """
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"TFDS data_dir not found: {data_dir}")
    try:
        builder = tfds.builder(name, data_dir=str(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"{data_dir}: no TFDS builder named {name!r} is importable here; "
                        f"this module defines {NAME!r}") from None
    version_dir = pathlib.Path(builder.data_dir)
    if not (version_dir / "dataset_info.json").is_file():
        raise DataError(f"no prepared TFDS dataset at {version_dir}; write one with "
                        "recsys.data.tfds_source.prepare(raw, data_dir)")
    source = builder.as_data_source(split="train")
    side_path = version_dir / SIDE_INFO
    if not side_path.is_file():
        raise DataError(f"{side_path}: side info missing; rewrite the dataset with prepare()")
    users, items, timestamps = _read_events(source)
    meta, items_info, users_info = _read_side_info(side_path)
    return RawData(name=meta["name"], user_ids=_restore(users, meta["user_id_kind"]),
                   item_ids=_restore(items, meta["item_id_kind"]), timestamps=timestamps,
                   items=items_info, users=users_info)


def _read_events(source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([E] user id bytes, [E] item id bytes, [E] int64 timestamps) in event order."""
    users, items, times = [], [], []
    for start in range(0, len(source), _READ_CHUNK):
        records = source.__getitems__(range(start, min(start + _READ_CHUNK, len(source))))
        users.append(np.array([r["user_id"] for r in records], dtype=object))
        items.append(np.array([r["item_id"] for r in records], dtype=object))
        times.append(np.array([r["timestamp"] for r in records], dtype=np.int64))
    if not times:
        return np.zeros(0, "S1"), np.zeros(0, "S1"), np.zeros(0, np.int64)
    return (np.concatenate(users).astype(bytes), np.concatenate(items).astype(bytes),
            np.concatenate(times))


def _id_kind(ids: np.ndarray) -> str:
    return "int" if ids.dtype.kind in "iu" else "str"


def _restore(ids: np.ndarray, kind: str) -> np.ndarray:
    """[E] bytes ids -> int64 or str, as they were before writing."""
    return ids.astype(np.int64) if kind == "int" else np.char.decode(ids, "utf-8")


def _write_side_info(raw: RawData, path: pathlib.Path) -> None:
    items, users = raw.items, raw.users
    meta = {"name": raw.name, "genre_names": list(items.genre_names),
            "user_id_kind": _id_kind(raw.user_ids), "item_id_kind": _id_kind(raw.item_ids),
            "has_titles": items.titles is not None, "has_users": users is not None}
    arrays = {"item_ids": _storable(items.ids), "item_genres": items.genres,
              "item_year": items.year}
    if items.titles is not None:
        arrays["item_titles"] = np.asarray(items.titles, dtype=str)
    if users is not None:
        meta.update(feature_names=list(users.feature_names),
                    cardinalities=list(users.cardinalities))
        arrays.update(user_ids=_storable(users.ids), user_features=users.features)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def _storable(ids: np.ndarray) -> np.ndarray:
    """Ids as int64 or fixed-width str (npz without pickle)."""
    return ids.astype(np.int64) if ids.dtype.kind in "iu" else np.asarray(ids, dtype=str)


def _read_side_info(path: pathlib.Path) -> tuple[dict, ItemInfo, UserInfo | None]:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        items = ItemInfo(ids=z["item_ids"], genres=z["item_genres"],
                         genre_names=tuple(meta["genre_names"]), year=z["item_year"],
                         titles=z["item_titles"] if meta["has_titles"] else None)
        users = None
        if meta["has_users"]:
            users = UserInfo(ids=z["user_ids"], features=z["user_features"],
                             feature_names=tuple(meta["feature_names"]),
                             cardinalities=tuple(meta["cardinalities"]))
    return meta, items, users
