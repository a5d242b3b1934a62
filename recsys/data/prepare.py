"""Writes a config's training examples once, as a TFDS dataset of ArrayRecord shards plus a spec.

`prepare(cfg.data, DIR)` builds the Dataset, then writes record i = training example i in
storage order (`recsys.data.batches.storage_order`: the positions of
`ds.train_positions(cfg.trained_on, cfg.max_examples_per_user)` in their own order up to
`cfg.shuffle_window` examples, pre-shuffled above): exactly what
`recsys.data.batches.example_inputs` returns for its position, with the example's index and
position. Shards hold at most a window of examples, so reading one window touches one or
two. Training then reads batches through Grain (`recsys.data.grain_input`) without ever
loading the event log.

    DIR/spec.json                 format, features (name, dtype, shape), counts, vocabulary
                                  sizes, history_len, the data config; written last
    DIR/tables.npz                item and user feature tables, item ids, user ids, and how
                                  often each item is a training target (log q)
    DIR/recsys_examples/1.0.0/    the TFDS dataset: split "train", its shards and dataset_info

Each record holds one TFDS feature, `example`: the example's row as bytes (uint8 [row_bytes],
`Encoding.BYTES`), laid out as the numpy structured dtype `row_dtype(spec["features"])`
(little-endian, no padding). One feature per record keeps decoding to one `np.frombuffer` per
batch; `tfds.builder_from_directory(DIR/recsys_examples/1.0.0).as_data_source("train")` reads
it like any TFDS dataset.

Everything is written under DIR.tmp and renamed to DIR when complete, so a DIR with a
spec.json is always whole. In process, `tfds.core.SequentialWriter` streams the records into
TFDS's shards (at most 256 MiB and a window each); with `beam_options` (`recsys prepare
--beam`), the builder's Beam pipeline and TFDS's Beam writer do, on the DirectRunner here or
on Dataflow, Flink or Spark (workers rebuild the Dataset from the data config, so its files
must be reachable from them).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tempfile
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from recsys.config import DataConfig
from recsys.data import dataset
from recsys.data.batches import example_inputs, storage_order
from recsys.data.schema import DataError

NAME = "recsys_examples"  # the TFDS dataset name (from the builder class name)
SPLIT = "train"
FEATURE = "example"  # the one TFDS feature: a packed row
SPEC = "spec.json"
TABLES = "tables.npz"
FORMAT = "recsys-prepared-examples"
FORMAT_VERSION = 2  # 2: records in storage order (data.shuffle_window)
ID_FIELDS = ("index", "position")  # in every row before the model inputs
_CHUNK = 65_536  # examples packed at once (bounds temporary memory)
_SHARD_BYTES = 256 << 20  # at most this much per shard (and at most a window of examples)
# Datasets of the configs being prepared (JSON -> (Dataset, positions)): generation reads the
# one prepare() built; a Beam worker in another process builds its own once.
_DATASETS: dict[str, tuple[dataset.Dataset, np.ndarray]] = {}


def row_dtype(features: list[dict]) -> np.dtype:
    """The structured dtype of one record's row from the spec's `features` list."""
    return np.dtype([(f["name"], np.dtype(f["dtype"]).newbyteorder("<"), tuple(f["shape"]))
                     for f in features])


def example_rows(ds: dataset.Dataset, positions_P: np.ndarray, first_index: int) -> np.ndarray:
    """Rows of the examples at `positions_P`, numbered from `first_index`: [P] structured."""
    inputs = example_inputs(ds, positions_P)
    cols = {"index": first_index + np.arange(len(positions_P), dtype=np.int64),
            "position": np.asarray(positions_P, np.int64), **inputs}
    features = [{"name": k, "dtype": v.dtype.name, "shape": list(v.shape[1:])}
                for k, v in cols.items()]
    rows = np.empty(len(positions_P), row_dtype(features))
    for k, v in cols.items():
        rows[k] = v
    return rows


def features_of(ds: dataset.Dataset, positions: np.ndarray) -> list[dict]:
    """The spec's `features`: name, dtype and per-example shape of every row field, in order."""
    rows = example_rows(ds, positions[:1], 0)
    return [{"name": name, "dtype": rows.dtype[name].base.name,
             "shape": list(rows.dtype[name].shape)} for name in rows.dtype.names]


@dataclasses.dataclass(frozen=True)
class _Job:
    """What the builder writes: the data config (as JSON, the cache key) and the row layout."""

    data_json: str
    num_examples: int
    features: tuple[dict, ...]

    @property
    def per_shard(self) -> int:
        """Examples per shard: the window split into equal parts of at most _SHARD_BYTES."""
        window = json.loads(self.data_json)["shuffle_window"]
        row_bytes = row_dtype(list(self.features)).itemsize
        parts = -(-window * row_bytes // _SHARD_BYTES)
        return max(1, -(-window // parts))


class RecsysExamples(tfds.core.GeneratorBasedBuilder):
    """Training examples of one data config; `job` is only needed to write, never to read.

    `download_and_prepare` generates with Beam. In process, `prepare` streams the examples
    through `tfds.core.SequentialWriter` with this builder's DatasetInfo instead: TFDS's
    in-process writer keeps up to 1 GB of examples in memory and then spills them with
    `tf.io.gfile`, which needs TensorFlow.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "One packed row per training example (see recsys/data/prepare.py).",
    }

    def __init__(self, *, job: _Job, **kwargs):
        self._job = job
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs() wants a package directory.
        row_bytes = row_dtype(list(self._job.features)).itemsize
        features = tfds.features.FeaturesDict({FEATURE: tfds.features.Tensor(
            shape=(row_bytes,), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)})
        # disable_shuffling: record i is example i (TFDS orders records by their int key).
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True,
                                     description="recsys training examples (recsys prepare)")

    def _split_generators(self, dl_manager):
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
        """A Beam PTransform yielding every (key, example), one chunk of examples per element."""
        import apache_beam as beam

        starts = list(range(0, self._job.num_examples, _CHUNK))
        return (beam.Create(starts)
                | "Spread" >> beam.Reshuffle()  # chunks to many workers, not fused into one
                | "Examples" >> beam.FlatMap(_chunk_examples, data_json=self._job.data_json))


def _chunk_examples(start: int, data_json: str):
    """(key, example) of examples start .. start + _CHUNK - 1 (storage order); key = the
    example's index."""
    ds, positions = _dataset(data_json)
    n = len(positions)
    stored = storage_order(n, json.loads(data_json)["shuffle_window"], start,
                           min(_CHUNK, n - start))
    rows = example_rows(ds, positions[stored], start)
    bytes_PxR = rows.view(np.uint8).reshape(len(rows), rows.dtype.itemsize)
    for j in range(len(rows)):
        yield start + j, {FEATURE: bytes_PxR[j]}


def _dataset(data_json: str) -> tuple[dataset.Dataset, np.ndarray]:
    if data_json not in _DATASETS:  # a Beam worker of another process: build it once
        from recsys.data.sources import load_raw
        cfg = DataConfig(**json.loads(data_json))
        ds = dataset.build(load_raw(cfg), cfg)
        _DATASETS[data_json] = (ds, ds.train_positions(cfg.trained_on, cfg.max_examples_per_user))
    return _DATASETS[data_json]


def data_fields(cfg: DataConfig) -> dict:
    """The data config fields that decide the examples (all but `prepared`)."""
    fields = dataclasses.asdict(cfg)
    fields.pop("prepared", None)
    return fields


def prepare(cfg: DataConfig, out: str | pathlib.Path, *, beam_options: list[str] | None = None,
            num_shards: int | None = None) -> pathlib.Path:
    """Writes the training examples of `cfg` to `out` (replacing a prepared directory there).

    Args:
      cfg: the data config; its `prepared` field is ignored.
      out: the directory to write; an existing one must be empty or a prepared directory.
      beam_options: run TFDS's Beam writer with these pipeline options (e.g.
        ["--runner=DirectRunner"]; [] means Beam's defaults); None writes in this process.
      num_shards: TFDS shards to write (None: shards of at most 256 MiB and at most
        cfg.shuffle_window examples, what a reader of one window at a time wants).

    Returns:
      `out`, complete.

    Raises:
      DataError: `out` is something else, there are no training examples, or the data source
        cannot be read.
    """
    out = pathlib.Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / SPEC).is_file())):
        raise DataError(f"{out}: exists and is not a prepared directory (no {SPEC}); "
                        "refusing to overwrite it")
    from recsys.data.sources import load_raw
    ds = dataset.build(load_raw(cfg), cfg)
    positions = ds.train_positions(cfg.trained_on, cfg.max_examples_per_user)
    if len(positions) == 0:
        raise DataError(f"{ds.name}: no training examples (data.trained_on={cfg.trained_on})")
    data_json = json.dumps(data_fields(cfg), sort_keys=True)
    job = _Job(data_json, len(positions), tuple(features_of(ds, positions)))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted run left
    tmp.mkdir(parents=True)
    _DATASETS[data_json] = (ds, positions)
    try:
        version_dir = _write_records(job, tmp, beam_options, num_shards)
    finally:
        _DATASETS.pop(data_json, None)
    _write_tables(ds, positions, tmp / TABLES)
    spec = _spec(cfg, ds, job, tmp, version_dir)
    (tmp / SPEC).write_text(json.dumps(spec, indent=2) + "\n")  # last: marks the whole
    _swap_in(tmp, out)
    return out


def _write_records(job: _Job, tmp: pathlib.Path, beam_options: list[str] | None,
                   num_shards: int | None) -> pathlib.Path:
    """Writes the TFDS dataset under `tmp`; returns its version directory."""
    builder = RecsysExamples(job=job, data_dir=str(tmp), file_format="array_record")
    if beam_options is not None:
        from apache_beam.options.pipeline_options import PipelineOptions
        config = tfds.download.DownloadConfig(
            try_download_gcs=False,
            num_shards=num_shards or -(-job.num_examples // job.per_shard),
            beam_options=PipelineOptions(flags=list(beam_options)))
        with tempfile.TemporaryDirectory() as downloads:  # nothing is downloaded
            builder.download_and_prepare(download_dir=downloads, download_config=config)
    else:
        per_shard = -(-job.num_examples // num_shards) if num_shards else job.per_shard
        pathlib.Path(builder.data_dir).mkdir(parents=True)
        writer = tfds.core.SequentialWriter(builder.info, max_examples_per_shard=per_shard,
                                            file_format="array_record")
        writer.initialize_splits([SPLIT])
        for start in range(0, job.num_examples, _CHUNK):
            writer.add_examples({SPLIT: [ex for _, ex in _chunk_examples(start, job.data_json)]})
        writer.close_all()
    written = tfds.builder_from_directory(builder.data_dir).info.splits[SPLIT].num_examples
    if written != job.num_examples:
        raise DataError(f"TFDS wrote {written} examples, expected {job.num_examples}")
    return pathlib.Path(builder.data_dir)


def _write_tables(ds: dataset.Dataset, positions: np.ndarray, path: pathlib.Path) -> None:
    f = ds.features
    arrays = {"item_genres": f.item_genres, "item_year": f.item_year,
              "item_release_year": f.item_release_year, "user_features": f.user_features,
              "item_counts": ds.item_counts(positions),
              "item_ids": _storable(ds.items.ids), "user_ids": _storable(ds.users.ids)}
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


def _storable(ids: np.ndarray) -> np.ndarray:
    """Raw ids (row 0's placeholder included) as int64 or fixed-width str: npz without pickle."""
    ids = np.asarray(ids)
    return ids.astype(np.int64) if ids.dtype.kind in "iu" else ids.astype(str)


def _spec(cfg: DataConfig, ds: dataset.Dataset, job: _Job, root: pathlib.Path,
          version_dir: pathlib.Path) -> dict:
    builder = tfds.builder_from_directory(str(version_dir))
    record = builder.as_data_source(
        split=SPLIT, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)[0]
    split = builder.info.splits[SPLIT]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "dataset": ds.name,
        "tfds": {"dir": str(version_dir.relative_to(root)), "name": NAME, "version": str(RecsysExamples.VERSION),
                 "split": SPLIT, "feature": FEATURE, "shard_lengths": list(split.shard_lengths),
                 "record_bytes": len(record)},
        "features": list(job.features),
        "row_bytes": row_dtype(list(job.features)).itemsize,
        "num_examples": job.num_examples,
        "num_events": len(ds.seq_items), "num_users": ds.num_users,
        "num_items": ds.num_items,
        "vocab": {"user_rows": ds.users.size, "item_rows": ds.items.size,
                  "num_genres": int(ds.features.item_genres.shape[1]),
                  "user_cardinalities": list(ds.features.user_cardinalities),
                  "genre_names": list(ds.genre_names)},
        "history_len": ds.history_len,
        "data": data_fields(cfg),
    }


def _swap_in(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Renames the finished `tmp` to `out`, replacing a prepared directory (or an empty one)."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
