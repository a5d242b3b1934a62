"""A catalogue split into S row ranges, one ScaNN searcher each, searched together and merged.

For catalogues beyond one host's memory: each shard is an ordinary searcher over its own rows
(built in parallel here, on separate hosts in a deployment), saved in its own directory
`shard_000`, `shard_001`, ... of the index, and a query's top-k is the best k of the shards'
top-k lists by score (equal scores: the lower shard first, as one searcher would order rows).
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib

import numpy as np

from recsys.config import IndexConfig
from recsys.index import searcher as searcher_lib
from recsys.index.params import derive_params


def shard_dir(i: int) -> str:
    return f"shard_{i:03d}"


class ShardedSearcher:
    """Top-k over S searchers of disjoint row ranges, merged by score."""

    kind = "sharded"

    def __init__(self, shards: list, num_rows: int, dim: int):
        self.shards, self.num_rows, self.dim = list(shards), num_rows, dim
        self.rows_M = np.concatenate([s.rows_M for s in self.shards])

    @classmethod
    def build(cls, item_vectors: np.ndarray, cfg: IndexConfig,
              valid_mask: np.ndarray | None = None) -> ShardedSearcher:
        """cfg.num_shards equal row ranges of `item_vectors` [N, D], each with its own ScaNN
        parameters (derived from its size, as one searcher's are), built in parallel.

        Each shard reads and copies only its own row range (passed as a view: `item_vectors`
        may be a memory map), so a host that builds one shard holds that shard, not the
        catalogue; here, one process holds every shard (one copy of the catalogue in all)."""
        items_NxD = np.ascontiguousarray(item_vectors, np.float32)
        n, dim = items_NxD.shape
        valid_N = np.ones(n, bool) if valid_mask is None else np.asarray(valid_mask, bool)
        bounds = np.linspace(0, n, cfg.num_shards + 1).astype(int)

        def one(i: int):
            mask = np.zeros(n, bool)
            mask[bounds[i]:bounds[i + 1]] = valid_N[bounds[i]:bounds[i + 1]]
            params = derive_params(max(int(mask.sum()), 1), dim, cfg)
            return searcher_lib.ScannSearcher(items_NxD, params, mask)

        workers = min(cfg.num_shards, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            shards = list(pool.map(one, range(cfg.num_shards)))
        return cls(shards, n, dim)

    @property
    def params(self):
        """The first shard's parameters (every shard is built by the same rule)."""
        return self.shards[0].params

    def with_query_params(self, leaves_to_search: int, reorder: int) -> ShardedSearcher:
        """Every tree shard searched with these settings (capped at its own leaves)."""
        return ShardedSearcher(
            [s.with_query_params(min(leaves_to_search, s.params.num_leaves), reorder)
             if s.params.mode == "tree_ah" else s for s in self.shards], self.num_rows, self.dim)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best k of the shards' top-k lists; same shapes and padding as one searcher's."""
        results = [s.search(queries, k) for s in self.shards]
        scores = np.concatenate([r[0] for r in results], axis=-1)
        rows = np.concatenate([r[1] for r in results], axis=-1)
        order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
        return (np.take_along_axis(scores, order, axis=-1),
                np.take_along_axis(rows, order, axis=-1))

    def save(self, directory: str | pathlib.Path) -> None:
        """Each shard in its own directory, then the descriptor naming how many there are."""
        directory = searcher_lib._start_save(directory)
        for i, shard in enumerate(self.shards):
            shard.save(directory / shard_dir(i))
        np.save(directory / searcher_lib.ROWS_FILE, self.rows_M)
        searcher_lib._write_descriptor(directory, self, extra={"num_shards": len(self.shards)})


def load_shards(directory: pathlib.Path, desc: dict) -> ShardedSearcher:
    """The shards of a sharded index, each from its own directory (names made here, not read)."""
    count = int(desc["num_shards"])
    expected = {shard_dir(i) for i in range(count)} | {searcher_lib.DESCRIPTOR_FILE,
                                                       searcher_lib.ROWS_FILE}
    for name in sorted(set(os.listdir(directory)) - expected):
        raise searcher_lib.IndexLoadError(f"{directory / name}: not a file of a sharded index")
    shards = [searcher_lib.load(directory / shard_dir(i)) for i in range(count)]
    return ShardedSearcher(shards, int(desc["num_rows"]), int(desc["dim"]))
