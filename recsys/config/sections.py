"""The run configuration's sections: frozen dataclasses, one per part of the system.

Each section checks its own fields when it is built (`__post_init__`): `Literal` fields must
hold one of their choices and numeric fields their ranges, so a bad value is refused where it
is written (a config file, `--set`, `Recommender.load(**overrides)`, a manifest). `validate`
adds the checks that need several sections at once.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import ClassVar, Literal

# Item release years become buckets: 0 unknown, then 5-year buckets from 1900 (data and models).
NUM_YEAR_BUCKETS = 32


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


class _Section:
    """Checks Literal choices, then the section's own `_check` rules, when an instance is built."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self):
        for name, hint in typing.get_type_hints(type(self)).items():
            if typing.get_origin(hint) is Literal:
                allowed = typing.get_args(hint)
                if getattr(self, name) not in allowed:
                    raise ConfigError(f"{self.SECTION}.{name}={getattr(self, name)!r}: must be one "
                                      f"of {', '.join(map(str, allowed))}")
        self._check()

    def _check(self) -> None:
        pass

    def _require(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{self.SECTION}.{name}={getattr(self, name)!r}: {rule}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(_Section):
    SECTION: ClassVar[str] = "data"
    # where events come from (events: a team's own Parquet/CSV files, mapped by the fields below)
    source: Literal["synthetic", "movielens", "tfds", "events"] = "synthetic"
    # movielens: the MovieLens directory; tfds: a TFDS data_dir; events: a Parquet or CSV file,
    # a directory of them or a glob ("events/*.parquet", files read in name order)
    path: str = ""
    tfds_name: str = "recsys_interactions"  # dataset name inside path for source=tfds
    # a directory `recsys prepare` wrote from this data config: training reads its examples with
    # Grain, a batch at a time, instead of building them in memory ("" = in memory)
    prepared: str = ""
    # Synthetic source (ignored by the others).
    num_users: int = 2000  # users generated
    num_items: int = 1000  # items generated
    interactions_per_user: float = 30.0  # mean events per user (geometric spread)
    num_clusters: int = 16  # planted taste clusters
    num_genres: int = 12  # item categories, correlated with clusters
    zipf_exponent: float = 1.0  # item popularity skew
    taste_drift: float = 0.3  # probability per event of drifting to a neighbouring cluster
    seed: int = 0  # generator seed; same seed -> identical data
    # Features and examples (all sources).
    history_len: int = 20  # items of history fed to the query tower (the last N before the event)
    min_user_events: int = 3  # users with fewer events are dropped (need train, validation, test)
    max_examples_per_user: int = 0  # cap on training targets per user (0 = no cap)
    trained_on: Literal["train+val", "train"] = "train+val"  # train: validation only for early stopping
    # Each epoch shuffles the training examples whole up to this many; above, in windows of this
    # many (stored pre-shuffled, so a window is a uniform sample of all), and a reader of
    # prepared data holds only one or two windows' shards whatever the data's size
    shuffle_window: int = 1 << 21
    # Events whose item is not in the catalogue (e.g. missing from movies.csv): counted and
    # reported, then dropped, or refused with an error naming the first one.
    unknown_items: Literal["drop", "fail"] = "drop"
    # Events source (data.source=events; docs/data.md "Events"): column names in the files.
    user_column: str = "user_id"  # events: user id column (ints or text); keys the user table
    item_column: str = "item_id"  # events: item id column (ints or text); keys the item table
    timestamp_column: str = "timestamp"  # events: time column (epoch seconds or ISO-8601 text)
    weight_column: str = ""  # events: numeric weight column, checked, not used yet ("" = none)
    item_features_path: str = ""  # events: item table, Parquet/CSV file, dir or glob ("" = none)
    user_features_path: str = ""  # events: user table, Parquet/CSV file, dir or glob ("" = none)
    multi_value_separator: str = "|"  # events: splits multi-valued text ("A|B") into multi-hot
    max_bad_fraction: float = 0.01  # events: share of rows (no id/time) dropped before refusing

    def _check(self) -> None:
        for name in ("num_users", "num_items", "history_len"):
            self._require(getattr(self, name) > 0, name, "must be positive")
        self._require(self.max_examples_per_user >= 0, "max_examples_per_user", "must be >= 0")
        self._require(self.shuffle_window > 0, "shuffle_window", "must be positive")
        self._require(0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction",
                      "must be in [0, 1]")
        self._require(bool(self.multi_value_separator), "multi_value_separator",
                      "must not be empty")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(_Section):
    SECTION: ClassVar[str] = "model"
    embed_dim: int = 32  # width of id embeddings
    hidden_dims: tuple[int, ...] = (64,)  # tower MLP widths before the output layer
    out_dim: int = 32  # D: width of the normalised query and item vectors
    # mean | recency (decayed by position) | attention (with positions) | none (the query tower
    # reads no history: ids and features only)
    history_pooling: Literal["mean", "recency", "attention", "none"] = "mean"
    recency_decay: float = 0.8  # weight multiplier per step back in history (recency pooling)
    use_user_id: bool = True  # include the user id embedding in the query tower
    use_features: bool = True  # genres/year/user features in the towers
    time_features: bool = False  # query tower reads log hours since the previous event and the era
    temperature: float = 0.05  # initial softmax temperature
    learn_temperature: bool = False  # train log(temperature) with the towers
    dropout: float = 0.0  # dropout rate in tower MLPs
    # Each tower ends in a linear layer to out_dim; false: its vector is its embeddings side by
    # side (matrix factorisation's towers: needs hidden_dims=() and both towers out_dim wide)
    output_layer: bool = True

    @property
    def reads_history(self) -> bool:
        """Whether the query tower reads the history (history_pooling is not "none")."""
        return self.history_pooling != "none"

    def _check(self) -> None:
        for name in ("embed_dim", "out_dim"):
            self._require(getattr(self, name) > 0, name, "must be positive")
        self._require(all(h > 0 for h in self.hidden_dims), "hidden_dims", "widths must be positive")
        self._require(self.reads_history or self.use_user_id or self.use_features
                      or self.time_features, "history_pooling",
                      "none leaves the query tower no input: set model.use_user_id, "
                      "model.use_features or model.time_features")
        if not self.output_layer:
            self._require(self.hidden_dims == (), "output_layer",
                          f"false needs model.hidden_dims=() (not {self.hidden_dims})")
            item_width = self.embed_dim * (3 if self.use_features else 1)
            self._require(item_width == self.out_dim, "output_layer",
                          f"false makes the item vector its embeddings, {item_width} wide: "
                          f"model.out_dim={self.out_dim} must equal that")
        self._require(self.temperature > 0, "temperature", "must be > 0")
        self._require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankerConfig(_Section):
    """Stage 3: the DCN-v2 ranker's shape and how it is trained."""

    SECTION: ClassVar[str] = "ranker"
    # Model.
    hidden_dims: tuple[int, ...] = (128, 64)  # deep-MLP widths
    embed_dim: int = 16  # width of the ranker's own id and feature embeddings
    cross_layers: int = 2  # DCN-v2 cross layers (0 = deep MLP only)
    cross_rank: int = 0  # cross-layer weight rank (0 = full matrix, >0 = low-rank U V)
    structure: Literal["stacked", "parallel"] = "stacked"  # cross then deep | cross beside deep
    use_ids: bool = False  # the ranker's own user/item id embeddings (+ DIN over them);
    # they memorise when each user gives one training event (events=validation)
    use_vectors: bool = False  # raw q, c, q*c vectors (only for events=training:
    # otherwise they come from another retrieval model than serving's)
    dropout: float = 0.0  # dropout rate in the deep MLP
    # Training.
    steps: int = 300  # training steps (0 = no ranker; serving orders by retrieval)
    batch_size: int = 128  # events per step
    learning_rate: float = 0.003  # Adam learning rate
    weight_decay: float = 0.0  # decoupled weight decay (adamw when > 0)
    negatives: int = 15  # negatives per event from the top-R (0 = the whole top-R list)
    random_negatives: int = 4  # of `negatives`, drawn uniformly from the catalogue
    loss: Literal["softmax", "bce"] = "softmax"  # listwise over the event's candidates | pointwise
    # What the ranker learns from (recsys.train.ranker.ranker_events; each event scored by a
    # retrieval model that never saw it).
    events: Literal["holdout", "validation", "training"] = "holdout"
    folds: int = 3  # K: users split into K folds; K-fold validation NDCG@10 picks the steps
    holdout_events: int = 3  # holdout events: latest events per user a shadow model skips
    eval_every: int = 100  # steps between K-fold validation NDCG@10 (0 = at the end)
    patience: int = 3  # evaluations without improvement before the K-fold run stops (0 = off)

    def _check(self) -> None:
        for name in ("embed_dim", "batch_size", "holdout_events"):
            self._require(getattr(self, name) > 0, name, "must be positive")
        for name in ("steps", "cross_layers", "cross_rank", "negatives", "random_negatives",
                     "eval_every", "patience"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
        self._require(all(h > 0 for h in self.hidden_dims), "hidden_dims", "widths must be positive")
        self._require(self.learning_rate > 0, "learning_rate", "must be > 0")
        self._require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self._require(self.folds >= 2, "folds", "cross-validation needs >= 2 folds")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig(_Section):
    SECTION: ClassVar[str] = "mesh"
    data: int = -1  # devices along the data axis (-1 = all remaining devices)
    model: int = 1  # devices along the model axis (embedding rows are split over both)
    device_memory_gib: float = 0.0  # per-device memory for the memory plan, GiB (0 = ask the device)

    def _check(self) -> None:
        self._require(self.data > 0 or self.data == -1, "data", "must be positive or -1")
        self._require(self.model > 0, "model", "must be positive")
        self._require(self.device_memory_gib >= 0, "device_memory_gib", "must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(_Section):
    """Retrieval training: optimisation, negatives, evaluation and checkpoint cadence."""

    SECTION: ClassVar[str] = "train"
    batch_size: int = 256  # global batch (examples per step over all devices)
    num_steps: int = 500  # retrieval training steps
    learning_rate: float = 0.01  # peak learning rate
    optimizer: Literal["adam", "adagrad", "sgd"] = "adam"  # dense parameters' optimizer
    weight_decay: float = 0.0  # decoupled weight decay (adamw when > 0)
    logq_correction: bool = True  # subtract log q(item) from in-batch logits
    # counts (training-set frequencies) | streaming (Yi et al. 2019)
    logq_estimate: Literal["counts", "streaming"] = "counts"
    logq_buckets: int = 0  # hash buckets of the streaming estimate (0 = one per item row)
    logq_learning_rate: float = 0.001  # streaming estimate: weight of a sighting after 1/rate
    # tables: dense (optax) | rowwise_adagrad | lazy_adam (sparse row updates) | auto: sparse
    # (lazy_adam after adam, rowwise_adagrad after adagrad) when the item table has more rows
    # than a step looks up, dense otherwise (recsys.train.state.embedding_rule)
    embedding_optimizer: Literal["auto", "dense", "rowwise_adagrad", "lazy_adam"] = "auto"
    embedding_learning_rate: float = 0.0  # sparse table optimizer's rate (0 = learning_rate)
    remove_accidental_hits: bool = True  # mask negatives (every source) equal to the positive
    uniform_negatives: int = 0  # M: catalogue items drawn uniformly per step, shared negatives (0 = off)
    hard_negatives: int = 0  # keep only the k highest-scoring negatives per row (0 = all)
    mined_negatives: int = 0  # H: index-mined hard negatives per example (0 = off)
    mine_every_epochs: float = 1.0  # epochs between re-mining with the current vectors (first: after one)
    mine_ranks: tuple[int, ...] = (10, 100)  # rank band [lo, hi) that mined negatives are drawn from
    mine_stride: int = 1  # search once per k consecutive training events of a user (cost / k)
    mine_margin: float = 0.0  # skip mined items scoring above the positive's cosine minus this (<0 allows some)
    # fraction of the re-mining period between the snapshot a table is mined from and the first
    # step using it: the search runs on a thread meanwhile (0 = synchronous); in [0, 1)
    mine_lag: float = 0.5
    # mined negatives' vectors: embed (candidate tower every step, with gradients) | cached (the
    # mining snapshot's item vectors, no gradient; 1.7-2.4x faster steps, same quality)
    mined_vectors: Literal["embed", "cached"] = "cached"
    # log q of mined items: band (1/items left in the band) | uniform (1/N) | none
    mined_correction: Literal["band", "uniform", "none"] = "band"
    eval_every: int = 0  # steps between validation HR@K (0 = only at the end)
    early_stopping_patience: int = 0  # evaluations without improvement before stopping (0 = off)
    checkpoint_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # checkpoints kept on disk
    seed: int = 0  # parameter init and batch order
    log_every: int = 50  # steps between loss updates (progress, metrics.jsonl, TensorBoard)
    # Speed (docs/distributed.md "Throughput"): none of these changes the math; compute_dtype
    # changes the precision, and inside steps_per_call's scan XLA may round float32 differently.
    prefetch: int = 2  # global batches built and placed ahead on a background thread (0 = inline)
    steps_per_call: int = 1  # steps per jitted call (a lax.scan over stacked batches; 4 is
    # faster at small steps)
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # tower matmuls and logits
    # Block of the [B, N] logits computed at once, recomputed in the backward pass: columns of
    # the fused in-batch softmax, or rows with hard_negatives (0 = the whole matrix below 2048
    # examples, else a ~4 MiB block of columns, 128 at B=8192, or ~2 MiB of rows, 64).
    logits_chunk: int = 0

    def _check(self) -> None:
        self._require(self.batch_size > 0, "batch_size", "must be positive")
        self._require(self.prefetch >= 0, "prefetch", "must be >= 0")
        self._require(self.steps_per_call >= 1, "steps_per_call", "must be >= 1")
        self._require(self.logits_chunk >= 0, "logits_chunk", "must be >= 0")
        for name in ("num_steps", "weight_decay", "logq_buckets", "embedding_learning_rate",
                     "uniform_negatives", "hard_negatives", "mined_negatives", "eval_every",
                     "early_stopping_patience", "checkpoint_every"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
        self._require(self.learning_rate > 0, "learning_rate", "must be > 0")
        self._require(0 < self.logq_learning_rate <= 1, "logq_learning_rate", "must be in (0, 1]")
        self._require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        self._require(self.log_every >= 1, "log_every", "must be >= 1")
        if self.mined_negatives:
            lo_hi = self.mine_ranks
            self._require(len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1], "mine_ranks",
                          "must be two ranks lo,hi with 0 <= lo < hi")
            self._require(lo_hi[1] - lo_hi[0] >= self.mined_negatives, "mine_ranks",
                          f"holds fewer than train.mined_negatives={self.mined_negatives} items")
            self._require(self.mine_stride >= 1, "mine_stride", "must be >= 1")
            self._require(self.mine_every_epochs > 0, "mine_every_epochs", "must be > 0")
            self._require(0 <= self.mine_lag < 1, "mine_lag", "must be in [0, 1)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class IndexConfig(_Section):
    SECTION: ClassVar[str] = "index"
    kind: Literal["scann", "exact"] = "scann"  # approximate (ScaNN) or brute-force search
    num_leaves: int = 0  # ScaNN partitions (0 = derived from the catalogue size)
    leaves_to_search: int = 0  # partitions searched per query (0 = derived)
    reorder: int = 0  # candidates re-scored exactly (0 = derived)
    num_shards: int = 1  # S: row ranges with a ScaNN searcher each, searched together and merged
    # Tuning: the fastest query-time setting whose recall@recall_k against exact search on the
    # validation events' query vectors meets this (0 = keep the derived setting, untuned).
    target_recall: float = 0.95
    recall_k: int = 10  # k of the recall target
    tuning_queries: int = 2000  # query vectors sampled: half choose the setting, half measure it

    def _check(self) -> None:
        for name in ("num_leaves", "leaves_to_search", "reorder"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0 (0 = derived)")
        self._require(self.num_shards >= 1, "num_shards", "must be >= 1")
        self._require(0 <= self.target_recall <= 1, "target_recall", "must be in [0, 1] (0 = off)")
        self._require(self.recall_k >= 1, "recall_k", "must be >= 1")
        self._require(self.tuning_queries >= 2, "tuning_queries", "must be >= 2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig(_Section):
    """Artifacts publication (WORKDIR/artifacts/versions/<id>, switched by `current`)."""

    SECTION: ClassVar[str] = "export"
    keep_versions: int = 3  # artifact versions kept (the current one always; older ones removed)

    def _check(self) -> None:
        self._require(self.keep_versions >= 1, "keep_versions", "must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig(_Section):
    SECTION: ClassVar[str] = "eval"
    ks: tuple[int, ...] = (10, 50, 100)  # cut-offs for HR@K
    max_users: int = 0  # evaluate a deterministic subset of users (0 = all)
    item_chunk: int = 65536  # items scored at once by exact top-k

    def _check(self) -> None:
        self._require(bool(self.ks) and all(k > 0 for k in self.ks), "ks", "must be positive cut-offs")
        self._require(self.max_users >= 0, "max_users", "must be >= 0")
        self._require(self.item_chunk > 0, "item_chunk", "must be positive")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig(_Section):
    """Serving defaults; requests may override the ordering options and add filter rules."""

    SECTION: ClassVar[str] = "serve"
    num_candidates: int = 200  # R: items retrieved per request before filtering
    exclude_seen: bool = True  # drop the user's own history from recommendations
    ordering: Literal["topk", "mmr", "explore"] = "topk"  # default stage-4 policy
    mmr_lambda: float = 0.5  # MMR relevance weight in [0, 1] (1 = pure score order)
    mmr_similarity: Literal["vectors", "genres"] = "vectors"  # item cosine | shared genres
    genre_cap: int = 0  # most items per genre in one list (0 = no cap)
    explore_temperature: float = 0.3  # softmax temperature of explore sampling (score units)
    recent_items: int = 0  # extra source: the user's latest N items' nearest items (0 = off)
    neighbours_per_item: int = 10  # items retrieved per recent item by the extra source
    popular_candidates: int = 0  # extra source: the N most popular items for every request
    # Default item rules (requests add their own): genre names, and release years (0 = no bound).
    filter_genres_not: tuple[str, ...] = ()  # never serve items of these genres
    filter_genres_any: tuple[str, ...] = ()  # serve only items of at least one of these genres
    filter_year_min: int = 0  # earliest release year served (0 = no bound)
    filter_year_max: int = 0  # latest release year served (0 = no bound)

    def _check(self) -> None:
        self._require(self.num_candidates > 0, "num_candidates", "must be positive")
        self._require(0.0 <= self.mmr_lambda <= 1.0, "mmr_lambda", "must be in [0, 1]")
        self._require(self.explore_temperature > 0, "explore_temperature", "must be > 0")
        for name in ("genre_cap", "recent_items", "neighbours_per_item", "popular_candidates",
                     "filter_year_min", "filter_year_max"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("filter_year_min", "filter_year_max"):
            self._require(getattr(self, name) <= 9999, name, "must be a year <= 9999 (0 = no bound)")

    def filters(self) -> dict:
        """The default rules in the request form (see recsys.serve.requests.parse_filters)."""
        rules = {"genres_not": self.filter_genres_not, "genres_any": self.filter_genres_any,
                 "year_min": self.filter_year_min, "year_max": self.filter_year_max}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in rules.items() if v}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    name: str = "run"  # shown in logs and the manifest
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    ranker: RankerConfig = RankerConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    index: IndexConfig = IndexConfig()
    export: ExportConfig = ExportConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()
