"""ScaNN parameters derived from the catalogue size and width, honouring IndexConfig overrides."""

from __future__ import annotations

import dataclasses
import math

from recsys.config import IndexConfig

# Below this many indexed rows ScaNN scores every row exactly (brute force): a tree + hashing
# saves little there and costs recall; exact scoring of 2e4 x 64 is ~1.3M multiply-adds a query.
BRUTE_FORCE_MAX_ROWS = 20_000
# A tree with fewer leaves than this prunes too little to pay for itself: brute force instead.
MIN_LEAVES = 20
# Measured (shared/notes/index.md): ~2*sqrt(N) leaves beat sqrt(N) by ~2x at recall 0.95, but
# only with ~200 k-means training points per leaf.
LEAVES_PER_SQRT_ROW = 2.0
SAMPLES_PER_LEAF = 200
# Leaves searched per query: this fraction of the leaves, but never fewer than the floor. The
# floor decides up to ~5M rows. Measured on `clustered_vectors` (top-10, reorder 200): at 100k x 32
# (632 leaves) 32/40/48 leaves gave recall 0.955-0.960/0.960-0.965/0.963-0.968 over 2 seeds; at
# 1M x 64 (2000 leaves) 16 leaves gave 0.987-0.990 and 48 gave 0.992-0.995 at ~0.65x the speed.
SEARCH_FRACTION = 0.01
MIN_LEAVES_TO_SEARCH = 48
# Asymmetric-hashing candidates re-scored exactly (raised to k at query time when k is larger);
# 200 vs 100 added ~0.01 recall at 100k x 32 and ~0.001 at 1M x 64.
DEFAULT_REORDER = 200
DIMS_PER_BLOCK = 2
ANISOTROPIC_THRESHOLD = 0.2

MODES = ("tree_ah", "brute_force")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScannParams:
    """The ScaNN configuration one index was built with (JSON-able, for manifests)."""

    mode: str  # tree_ah | brute_force
    num_leaves: int = 0  # tree partitions (0 for brute_force)
    leaves_to_search: int = 0  # partitions scored per query
    training_sample_size: int = 0  # rows sampled to train the tree's k-means
    dims_per_block: int = DIMS_PER_BLOCK  # asymmetric-hashing dimensions per 16-centre codebook
    anisotropic_threshold: float = ANISOTROPIC_THRESHOLD  # score-aware quantization threshold
    reorder: int = 0  # hashed candidates re-scored in float32 per query

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"ScannParams.mode={self.mode!r}: must be one of {', '.join(MODES)}")
        if self.mode == "tree_ah" and not (
                1 <= self.leaves_to_search <= self.num_leaves <= self.training_sample_size
                and self.reorder >= 1 and self.dims_per_block >= 1):
            raise ValueError(f"inconsistent tree_ah parameters: {self}; need 1 <= leaves_to_search "
                             "<= num_leaves <= training_sample_size, reorder >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScannParams:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ScannParams fields: {', '.join(unknown)}")
        return cls(**d)


def derive_params(num_rows: int, dim: int, cfg: IndexConfig) -> ScannParams:
    """Chooses ScaNN settings for `num_rows` indexed vectors of width `dim`.

    Non-zero `cfg.num_leaves`, `cfg.leaves_to_search` and `cfg.reorder` replace the derived
    values. The result is brute force when `num_rows < BRUTE_FORCE_MAX_ROWS` or the number of
    leaves (derived or overridden) is below `MIN_LEAVES`; the other overrides then do not apply.

    Args:
      num_rows: vectors that will be indexed (valid rows only).
      dim: D, their width.
      cfg: the index section of the run config.

    Returns:
      The chosen parameters.
    """
    if num_rows <= 0 or dim <= 0:
        raise ValueError(f"cannot index {num_rows} rows of width {dim}: both must be positive")
    num_leaves = cfg.num_leaves or round(LEAVES_PER_SQRT_ROW * math.sqrt(num_rows))
    if num_rows < BRUTE_FORCE_MAX_ROWS or num_leaves < MIN_LEAVES:
        return ScannParams(mode="brute_force")
    if num_leaves > num_rows:
        raise ValueError(f"index.num_leaves={num_leaves} exceeds the {num_rows} rows indexed")
    leaves_to_search = cfg.leaves_to_search or max(
        MIN_LEAVES_TO_SEARCH, math.ceil(SEARCH_FRACTION * num_leaves))
    return ScannParams(
        mode="tree_ah",
        num_leaves=num_leaves,
        leaves_to_search=min(leaves_to_search, num_leaves),
        training_sample_size=min(num_rows, SAMPLES_PER_LEAF * num_leaves),
        reorder=cfg.reorder or DEFAULT_REORDER,
    )
