"""Reads prepared training examples (`recsys prepare`) with Grain: this process's rows of each
global batch, in the order of `recsys.data.batches.example_indices`, prefetched on threads.

    data = PreparedData.open("prepared/ml-1m", expect=cfg.data)     # spec, tables, records
    reader = data.batches(batch_size=4096, seed=0, rows=sharding.process_rows(mesh, 4096),
                          start_step=restored_step, prefetch=2)
    batch = next(reader)          # Batch(step, examples, positions, inputs)
    meta["input"] = reader.state_at(steps_done)  # checkpoint metadata: {"step": ..., "seed": ...}

For the same (seed, batch size) a batch holds exactly what `BatchOrder.at` + `example_inputs`
give for the Dataset the directory was prepared from. The order is a pure function of
(seed, step), so the step is the whole iterator state: a reader started at step s (or given
the state of one that reached s) yields what an uninterrupted reader yields from s.

Memory: the spec, the item and user tables (rows of the vocabularies), the record indexes of
the shards the last few batches read (an epoch reads the examples a window at a time, and a
window is one or two shards: `data.shuffle_window`), and at most `prefetch` decoded batches;
never the event log, and nothing that grows with the number of examples.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import threading
from typing import Self

import grain
import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from recsys.config import DataConfig
from recsys.data import prepare
from recsys.data.batches import example_indices
from recsys.data.dataset import FeatureTables
from recsys.data.schema import DataError

_ENDLESS = 1 << 62  # steps of a reader without an end


@dataclasses.dataclass(frozen=True)
class Batch:
    """This process's rows of global batch `step`.

    Attributes:
      examples: [R] int64 example (record) indices; positions: [R] int64 event positions in
        the Dataset the directory was prepared from (what `BatchOrder.at` returns).
      inputs: what `example_inputs` returns for those positions (user, history, user_feats,
        time_context, item, item_genres, item_year), each [R, ...].
    """

    step: int
    examples: np.ndarray
    positions: np.ndarray
    inputs: dict


class PreparedData:
    """A prepared directory, checked and opened: its spec, the tables training needs, records.

    Attributes:
      path, spec: the directory and its spec.json.
      features: the item and user feature tables (`FeatureTables`; item and user rows).
      item_counts: [V] int64 how often each item row is a training target (log q).
      item_ids, user_ids: raw ids by row (row 0: padding).
    """

    def __init__(self, path: pathlib.Path, spec: dict, tables: dict, shards: _Shards,
                 dtype: np.dtype):
        self.path, self.spec, self._shards, self._dtype = path, spec, shards, dtype
        vocab = spec["vocab"]
        self.features = FeatureTables(
            item_genres=tables["item_genres"], item_year=tables["item_year"],
            user_features=tables["user_features"],
            user_cardinalities=tuple(vocab["user_cardinalities"]),
            item_release_year=tables["item_release_year"])
        self.item_counts = tables["item_counts"]
        self.item_ids, self.user_ids = tables["item_ids"], tables["user_ids"]

    @classmethod
    def open(cls, path: str | pathlib.Path, expect: DataConfig | None = None) -> PreparedData:
        """Opens a directory `recsys prepare` wrote.

        Args:
          expect: the data config training runs with; every field that decides the examples
            must equal the one the directory was prepared with.

        Raises:
          DataError: one line naming the directory and what is wrong with it: missing, not
            (or not yet) prepared, another format version, prepared from other data fields,
            or records that do not match the spec.
        """
        path = pathlib.Path(path)
        hint = f"write it with `recsys prepare --config CONFIG --out {path}`"
        if not path.is_dir():
            raise DataError(f"prepared data {path}: no such directory; {hint}")
        if not (path / prepare.SPEC).is_file():
            half = (f" ({path.name} is the name `recsys prepare` writes to before renaming: that "
                    "run is still going or was interrupted)" if path.name.endswith(".tmp") else "")
            raise DataError(f"{path}: not a prepared directory, no {prepare.SPEC}{half}; {hint}")
        try:
            spec = json.loads((path / prepare.SPEC).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path / prepare.SPEC}: not JSON ({e}); {hint}") from None
        found = (spec.get("format"), spec.get("format_version"))
        if found != (prepare.FORMAT, prepare.FORMAT_VERSION):
            raise DataError(f"{path}: format {found[0]!r} version {found[1]!r}, but this recsys "
                            f"reads {prepare.FORMAT!r} version {prepare.FORMAT_VERSION}; {hint}")
        if expect is not None:
            _check_same_data(path, spec["data"], prepare.data_fields(expect))
        try:
            with np.load(path / prepare.TABLES, allow_pickle=False) as z:
                tables = {k: z[k] for k in z.files}
            info = tfds.builder_from_directory(str(path / spec["tfds"]["dir"])).info
            shards = _Shards(info.splits[spec["tfds"]["split"]].file_instructions,
                             spec["data"]["shuffle_window"])
            data = cls(path, spec, tables, shards, prepare.row_dtype(spec["features"]))
        except (OSError, ValueError, KeyError) as e:  # a damaged directory, not a user's code
            raise DataError(f"{path}: damaged ({type(e).__name__}: {e}); prepare it again"
                            ) from None
        data._check_records(info.features)
        return data

    # ---- what training needs besides batches -------------------------------------------------

    @property
    def num_examples(self) -> int:
        return self.spec["num_examples"]

    @property
    def shuffle_window(self) -> int:
        """The window of the order the examples were stored for (`data.shuffle_window`)."""
        return self.spec["data"]["shuffle_window"]

    @property
    def history_len(self) -> int:
        return self.spec["history_len"]

    @property
    def num_items(self) -> int:
        """Catalogue items (item rows - 1: row 0 is padding)."""
        return self.spec["num_items"]

    @property
    def vocab(self) -> dict:
        """user_rows, item_rows (vocabulary sizes, padding row included), num_genres,
        user_cardinalities, genre_names."""
        return self.spec["vocab"]

    # ---- records ------------------------------------------------------------------------------

    def read(self, examples_R: np.ndarray) -> tuple[np.ndarray, dict]:
        """(positions [R] int64, inputs) of these examples (record indices), in this order."""
        examples_R = np.asarray(examples_R, np.int64)
        size = self.spec["tfds"]["record_bytes"]
        records_RxS = self._shards.read(examples_R, size)
        if records_RxS is None:
            raise DataError(f"{self.path}: records of {examples_R[:3].tolist()}... are not "
                            f"{size} bytes each as {prepare.SPEC} says; prepare it again")
        # The packed row is the record's tail: the one bytes value of its one feature.
        tail = records_RxS[:, size - self._dtype.itemsize:]
        rows = np.ascontiguousarray(tail).view(self._dtype).reshape(len(examples_R))
        if not np.array_equal(rows["index"], examples_R):
            raise DataError(f"{self.path}: record {int(examples_R[0])} holds example "
                            f"{int(rows['index'][0])}; the shards do not match {prepare.SPEC}")
        inputs = {name: np.ascontiguousarray(rows[name])
                  for name in self._dtype.names if name not in prepare.ID_FIELDS}
        return rows["position"].copy(), inputs

    def batches(self, batch_size: int, seed: int, *, rows: np.ndarray | None = None,
                start_step: int = 0, num_steps: int | None = None,
                prefetch: int = 2) -> BatchReader:
        """Global batches from `start_step` (to `num_steps`, or endless); see `BatchReader`."""
        return BatchReader(self, batch_size, seed, rows=rows, start_step=start_step,
                           num_steps=num_steps, prefetch=prefetch)

    def _check_records(self, features) -> None:
        """The records hold spec.json's rows: their count, and the last one as TFDS's own
        decoder (`features`, the dataset's FeaturesDict) reads it."""
        spec, n = self.spec, len(self._shards)
        if n != self.num_examples:
            raise DataError(f"{self.path}: {n} records, but {prepare.SPEC} says "
                            f"{self.num_examples}; prepare it again")
        size = spec["tfds"]["record_bytes"]
        record = self._shards.read(np.array([n - 1]), size)
        decoded = (features.deserialize_example_np(record[0].tobytes())[spec["tfds"]["feature"]]
                   if record is not None else np.zeros(0, np.uint8))
        if decoded.size != self._dtype.itemsize or not np.array_equal(
                record[0, size - decoded.size:], decoded):
            raise DataError(f"{self.path}: records hold rows of {decoded.size} bytes that this "
                            f"reader cannot decode as {prepare.SPEC}'s features "
                            f"({self._dtype.itemsize} bytes); prepare it again")
        self.read([n - 1])  # its index field says n - 1


class _Shards:
    """A TFDS split's ArrayRecord shards as one sequence of records, read in the calling thread.

    One reader per shard, opened when a read needs it and shared by Grain's threads (a lock
    each: a read is a seek and a read), closed once KEEP_READS reads in a row have touched
    no window of examples it overlaps (windows: `window` consecutive records, what the order
    reads at a time): a reader holds its shard's whole record index (~11 bytes a record), so a
    process holds one or two windows' indexes, not all of them. Not array_record's
    ArrayRecordDataSource (what TFDS's and Grain's data sources wrap): it starts a thread pool
    per call, each new thread gets another malloc arena, and a reader of 300 batches of 1024
    from 183 MiB of records grew to 900 MiB RSS (flat at 350 MiB this way). Not
    `ArrayRecordReader.read(indices)` either: each call costs time in proportion to the shard's
    records (3 ms at 1M records), so batches slowed down as the data grew; seek + read costs
    ~5-20 us per record at any size.
    """

    OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # array_record's random-access advice
    BUFFER_BYTES = 4096  # read per record (rows are ~0.2-1 KiB; larger ones are read whole)
    KEEP_READS = 4  # reads in a row that leave a shard's windows untouched before it is closed

    def __init__(self, file_instructions, window: int):
        self.files = [f.filename for f in file_instructions]
        self.skip = np.array([f.skip for f in file_instructions], np.int64)
        self.start = np.concatenate([[0], np.cumsum([f.take for f in file_instructions])])
        self.window = window
        self._readers: list = [None] * len(self.files)
        self._locks = [threading.Lock() for _ in self.files]  # one read of a shard at a time
        self._lock = threading.Lock()  # opening, closing and the counts below
        self._reads = 0  # read() calls begun
        self._last_read = [0] * len(self.files)  # the read() last touching each shard's windows
        self._users = [0] * len(self.files)  # read() calls using each shard now

    @property
    def open_shards(self) -> list[int]:
        """The shards whose readers are open now."""
        return [i for i, r in enumerate(self._readers) if r is not None]

    def __len__(self) -> int:
        return int(self.start[-1])

    def read(self, index_R: np.ndarray, size: int) -> np.ndarray | None:
        """[R, size] uint8 records at these indices, or None if one is not `size` bytes."""
        if len(index_R) and not (0 <= index_R.min() and index_R.max() < len(self)):
            raise IndexError(f"record indices must lie in [0, {len(self)})")
        shard_R = np.searchsorted(self.start, index_R, side="right") - 1
        offset_R = index_R - self.start[shard_R] + self.skip[shard_R]
        out_RxS = np.empty((len(index_R), size), np.uint8)
        shards = np.unique(shard_R).tolist()
        with self._lock:
            self._reads += 1
            for shard in shards:
                self._users[shard] += 1
            for shard in self._window_shards(index_R):
                self._last_read[shard] = self._reads
        try:
            for shard in shards:
                rows = np.flatnonzero(shard_R == shard)
                rows = rows[np.argsort(offset_R[rows], kind="stable")]  # file order: fewer misses
                with self._locks[shard]:
                    reader = self._reader(shard)
                    records = []
                    for offset in offset_R[rows].tolist():
                        reader.seek(offset)
                        records.append(reader.read())
                flat = np.frombuffer(b"".join(records), np.uint8)
                if flat.size != len(rows) * size:
                    return None
                out_RxS[rows] = flat.reshape(len(rows), size)
        finally:
            with self._lock:
                for shard in shards:
                    self._users[shard] -= 1
                self._close_idle()
        return out_RxS

    def _reader(self, shard: int):
        """The shard's reader, opened if closed (the caller holds the shard's lock)."""
        with self._lock:
            reader = self._readers[shard]
        if reader is None:  # opened outside self._lock: it reads the shard's whole index
            reader = array_record_module.ArrayRecordReader(
                self.files[shard], options=self.OPTIONS, file_reader_buffer_size=self.BUFFER_BYTES)
            with self._lock:
                self._readers[shard] = reader
        return reader

    def _window_shards(self, index_R: np.ndarray) -> list[int]:
        """The shards that overlap the windows these records lie in."""
        out = set()
        for w in np.unique(index_R // self.window).tolist():
            first, last = w * self.window, min((w + 1) * self.window, len(self)) - 1
            lo, hi = np.searchsorted(self.start, [first, last], side="right") - 1
            out.update(range(int(lo), int(hi) + 1))
        return sorted(out)

    def _close_idle(self) -> None:
        """Closes the readers no read is using whose windows the last KEEP_READS reads did not
        touch (the caller holds self._lock)."""
        for shard in self.open_shards:
            if self._users[shard] == 0 and self._last_read[shard] <= self._reads - self.KEEP_READS:
                self._readers[shard].close()
                self._readers[shard] = None


def _check_same_data(path: pathlib.Path, prepared: dict, expected: dict) -> None:
    differ = [k for k in sorted(set(prepared) | set(expected))
              if prepared.get(k) != expected.get(k)]
    if differ:
        k = differ[0]
        more = f" (and {len(differ) - 1} more: {', '.join(differ[1:])})" if len(differ) > 1 else ""
        raise DataError(f"{path} was prepared with data.{k}={prepared.get(k)!r}, but the config "
                        f"has data.{k}={expected.get(k)!r}{more}; prepare it again with this "
                        "config, or train with the data fields it was prepared with")


class BatchReader:
    """This process's rows of global batches start_step, start_step + 1, ..., read by Grain.

    Batch s is built by `PreparedData.read(example_indices(s, rows, batch_size, n, seed,
    window))`
    inside a Grain pipeline over steps (`MapDataset.range(...).map(...)`), whose
    `to_iter_dataset(ReadOptions)` builds up to `prefetch` batches ahead on as many threads
    (0: each batch when asked). The state is Grain's iterator state, i.e. the next step.
    """

    def __init__(self, data: PreparedData, batch_size: int, seed: int, *,
                 rows: np.ndarray | None = None, start_step: int = 0,
                 num_steps: int | None = None, prefetch: int = 2):
        if batch_size <= 0 or prefetch < 0 or start_step < 0:
            raise ValueError(f"batch_size={batch_size} must be > 0, prefetch={prefetch} and "
                             f"start_step={start_step} >= 0")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rows = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= batch_size):
            raise ValueError(f"rows must lie in [0, batch_size={batch_size})")
        steps = grain.MapDataset.range(0, _ENDLESS if num_steps is None else num_steps)
        options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
        self._iter = iter(steps.map(self.at).to_iter_dataset(options))
        self.set_state({"step": start_step})

    def at(self, step: int) -> Batch:
        """Batch `step`, read now (no prefetch, no state change)."""
        examples = example_indices(step, self.rows, self.batch_size, self.data.num_examples,
                                   self.seed, self.data.shuffle_window)
        positions, inputs = self.data.read(examples)
        return Batch(step=int(step), examples=examples, positions=positions, inputs=inputs)

    def __iter__(self) -> BatchReader:
        return self

    def __next__(self) -> Batch:
        return next(self._iter)

    def close(self) -> None:
        """Stops the prefetch threads (also done when the reader is garbage-collected)."""
        self._iter.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_state(self) -> dict:
        """JSON-able: the step of the next batch this iterator yields (`state_at`)."""
        return self.state_at(int(self._iter.get_state()["next_index"]))

    def state_at(self, step: int) -> dict:
        """The state of a reader whose next batch is `step`, with what makes steps mean the same
        batches. A loop that reads ahead saves `state_at(steps done)` with its checkpoint."""
        return {"step": int(step), **self._order()}

    def _order(self) -> dict:
        """What decides which examples a step's batch holds, besides the step."""
        return {"seed": self.seed, "batch_size": self.batch_size,
                "num_examples": self.data.num_examples,
                "shuffle_window": self.data.shuffle_window}

    def set_state(self, state: dict) -> None:
        """Continues from `state["step"]`; the other keys, when present, must match this reader."""
        for k, v in self._order().items():
            if k in state and state[k] != v:
                raise DataError(f"input state has {k}={state[k]!r}, this reader {k}={v!r}: its "
                                "steps would be other batches")
        self._iter.set_state({"next_index": int(state["step"])})
