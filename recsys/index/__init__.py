"""Maximum-inner-product search over item vectors: exact and ScaNN searchers, parameters, recall."""

from recsys.index.params import ScannParams, derive_params
from recsys.index.recall import clustered_vectors, measure, recall_at_k
from recsys.index.searcher import (
    ExactSearcher,
    IndexLoadError,
    ScannSearcher,
    Searcher,
    build,
    load,
)
from recsys.index.sharded import ShardedSearcher

__all__ = ["ExactSearcher", "IndexLoadError", "ScannParams", "ScannSearcher", "Searcher",
           "ShardedSearcher", "build",
           "clustered_vectors", "derive_params", "load", "measure", "recall_at_k"]
