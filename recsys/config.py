"""Typed run configuration: frozen dataclasses, Python config files, dotted overrides."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import typing
from typing import Any

# Item release years become buckets: 0 unknown, then 5-year buckets from 1900 (data and models).
NUM_YEAR_BUCKETS = 32


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: str = "synthetic"  # synthetic | movielens | tfds
    path: str = ""  # directory with MovieLens files (movielens) or a TFDS data_dir (tfds)
    tfds_name: str = "recsys_interactions"  # dataset name inside path for source=tfds
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
    trained_on: str = "train+val"  # train+val | train (validation only for early stopping)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    embed_dim: int = 32  # width of id embeddings
    hidden_dims: tuple[int, ...] = (64,)  # tower MLP widths before the output layer
    out_dim: int = 32  # D: width of the normalised query and item vectors
    history_pooling: str = "mean"  # mean | recency (decayed by position) | attention (positions)
    recency_decay: float = 0.8  # weight multiplier per step back in history (recency pooling)
    use_user_id: bool = True  # include the user id embedding in the query tower
    use_features: bool = True  # genres/year/user features in the towers
    time_features: bool = False  # query tower reads log hours since the previous event and the era
    temperature: float = 0.05  # initial softmax temperature
    learn_temperature: bool = False  # train log(temperature) with the towers
    dropout: float = 0.0  # dropout rate in tower MLPs
    ranker_hidden_dims: tuple[int, ...] = (128, 64)  # ranker deep-MLP widths
    ranker_embed_dim: int = 16  # width of the ranker's own id and feature embeddings
    ranker_cross_layers: int = 2  # DCN-v2 cross layers (0 = deep MLP only)
    ranker_cross_rank: int = 0  # cross-layer weight rank (0 = full matrix, >0 = low-rank U V)
    ranker_structure: str = "stacked"  # stacked (cross then deep) | parallel (cross beside deep)
    ranker_use_ids: bool = False  # the ranker's own user/item id embeddings (+ DIN over them);
    # they memorise when each user gives one training event (ranker_events=validation)
    ranker_use_vectors: bool = False  # raw q, c, q*c vectors (only for ranker_events=training:
    # otherwise they come from another retrieval model than serving's)
    ranker_dropout: float = 0.0  # dropout rate in the ranker's deep MLP


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    data: int = -1  # devices along the data axis (-1 = all remaining devices)
    model: int = 1  # devices along the model axis (embedding rows are split over both)
    device_memory_gib: float = 0.0  # per-device memory for the memory plan, GiB (0 = ask the device)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    batch_size: int = 256  # global batch (examples per step over all devices)
    num_steps: int = 500  # retrieval training steps
    learning_rate: float = 0.01  # peak learning rate
    optimizer: str = "adam"  # adam | adagrad | sgd
    weight_decay: float = 0.0  # decoupled weight decay (adamw when > 0)
    logq_correction: bool = True  # subtract log q(item) from in-batch logits
    logq_estimate: str = "counts"  # counts (training-set frequencies) | streaming (Yi et al. 2019)
    logq_buckets: int = 0  # hash buckets of the streaming estimate (0 = one per item row)
    logq_learning_rate: float = 0.001  # streaming estimate: weight of a sighting after 1/rate
    embedding_optimizer: str = "dense"  # tables: dense (optax) | rowwise_adagrad | lazy_adam (sparse)
    embedding_learning_rate: float = 0.0  # sparse table optimizer's rate (0 = learning_rate)
    remove_accidental_hits: bool = True  # mask negatives (every source) equal to the positive
    uniform_negatives: int = 0  # M: catalogue items drawn uniformly per step, shared negatives (0 = off)
    hard_negatives: int = 0  # keep only the k highest-scoring negatives per row (0 = all)
    mined_negatives: int = 0  # H: index-mined hard negatives per example (0 = off)
    mine_every_epochs: float = 1.0  # epochs between re-mining with the current vectors (first: after one)
    mine_ranks: tuple[int, ...] = (10, 100)  # rank band [lo, hi) that mined negatives are drawn from
    mine_stride: int = 1  # search once per k consecutive training events of a user (cost / k)
    mine_margin: float = 0.0  # skip mined items scoring above the positive's cosine minus this (<0 allows some)
    mined_correction: str = "band"  # log q of mined items: band (1/items left in the band) | uniform (1/N) | none
    eval_every: int = 0  # steps between validation HR@K (0 = only at the end)
    early_stopping_patience: int = 0  # evaluations without improvement before stopping (0 = off)
    checkpoint_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # checkpoints kept on disk
    seed: int = 0  # parameter init and batch order
    ranker_steps: int = 300  # ranker training steps (0 = no ranker; serving orders by retrieval)
    ranker_batch_size: int = 128  # events per ranker step
    ranker_learning_rate: float = 0.003  # ranker learning rate
    ranker_weight_decay: float = 0.0  # decoupled weight decay of the ranker (adamw when > 0)
    ranker_negatives: int = 15  # negatives per event from the top-R (0 = the whole top-R list)
    ranker_random_negatives: int = 4  # of ranker_negatives, drawn uniformly from the catalogue
    ranker_loss: str = "softmax"  # softmax (listwise over the event's candidates) | bce (pointwise)
    ranker_events: str = "holdout"  # what the ranker learns from: holdout | validation |
    # training (recsys.train.ranker.ranker_events; each scored by a model that never saw it)
    ranker_folds: int = 3  # K: users split into K folds; K-fold validation NDCG@10 picks the steps
    ranker_holdout_events: int = 3  # holdout events: latest events per user a shadow model skips
    ranker_eval_every: int = 100  # ranker steps between K-fold validation NDCG@10 (0 = at the end)
    ranker_patience: int = 3  # evaluations without improvement before the K-fold run stops (0 = off)
    log_every: int = 50  # steps between progress-bar loss updates


@dataclasses.dataclass(frozen=True, kw_only=True)
class IndexConfig:
    kind: str = "scann"  # scann | exact
    num_leaves: int = 0  # ScaNN partitions (0 = derived from the catalogue size)
    leaves_to_search: int = 0  # partitions searched per query (0 = derived)
    reorder: int = 0  # candidates re-scored exactly (0 = derived)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    ks: tuple[int, ...] = (10, 50, 100)  # cut-offs for HR@K
    max_users: int = 0  # evaluate a deterministic subset of users (0 = all)
    item_chunk: int = 65536  # items scored at once by exact top-k


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    num_candidates: int = 200  # R: items retrieved per request before filtering
    exclude_seen: bool = True  # drop the user's own history from recommendations
    ordering: str = "topk"  # default stage-4 policy: topk | mmr | explore
    mmr_lambda: float = 0.5  # MMR relevance weight in [0, 1] (1 = pure score order)
    mmr_similarity: str = "vectors"  # MMR item similarity: vectors (item cosine) | genres
    genre_cap: int = 0  # most items per genre in one list (0 = no cap)
    explore_temperature: float = 0.3  # softmax temperature of explore sampling (score units)
    recent_items: int = 0  # extra source: the user's latest N items' nearest items (0 = off)
    neighbours_per_item: int = 10  # items retrieved per recent item by the extra source
    popular_candidates: int = 0  # extra source: the N most popular items for every request
    filters: str = ""  # default item rules as JSON, e.g. '{"year_min": 1990}' (requests add keys)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    name: str = "run"  # shown in logs and the manifest
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    index: IndexConfig = IndexConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()


_CHOICES = {
    "data.source": ("synthetic", "movielens", "tfds"),
    "data.trained_on": ("train+val", "train"),
    "model.history_pooling": ("mean", "recency", "attention"),
    "train.mined_correction": ("band", "uniform", "none"),
    "train.optimizer": ("adam", "adagrad", "sgd"),
    "train.embedding_optimizer": ("dense", "rowwise_adagrad", "lazy_adam"),
    "train.logq_estimate": ("counts", "streaming"),
    "index.kind": ("scann", "exact"),
    "model.ranker_structure": ("stacked", "parallel"),
    "train.ranker_loss": ("softmax", "bce"),
    "train.ranker_events": ("validation", "holdout", "training"),
    "serve.ordering": ("topk", "mmr", "explore"),
    "serve.mmr_similarity": ("vectors", "genres"),
}


def load(path: str | pathlib.Path) -> Config:
    """Runs `get_config()` from a Python config file (validated once overrides are applied)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"recsys_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not recsys Config")
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Applies `section.field=value` strings, coercing each value to the field's type."""
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        section_name, field_name = parts
        section = getattr(cfg, section_name, None)
        if not dataclasses.is_dataclass(section):
            raise ConfigError(f"unknown config section {section_name!r} in {item!r}; "
                              f"sections: {', '.join(_section_names())}")
        hints = typing.get_type_hints(type(section))
        if field_name not in hints:
            raise ConfigError(f"unknown config key {key!r}; {section_name} has: "
                              f"{', '.join(f.name for f in dataclasses.fields(section))}")
        value = _coerce(key, text.strip(), hints[field_name])
        cfg = dataclasses.replace(cfg, **{section_name: dataclasses.replace(section, **{field_name: value})})
    validate(cfg)
    return cfg


def _section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default)]


def _coerce(key: str, text: str, hint: Any) -> Any:
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is str:
            return text
        if typing.get_origin(hint) is tuple:
            (elem, _) = typing.get_args(hint)
            text = text.strip("()[] ")
            return tuple(_coerce(key, t.strip(), elem) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected a value of type {getattr(hint, '__name__', hint)}") from None
    raise ConfigError(f"{key}: fields of type {hint} cannot be overridden")


def validate(cfg: Config) -> None:
    """Rejects values no run can use, naming the field."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(allowed)}")
    positive = ["model.embed_dim", "model.out_dim", "train.batch_size", "data.history_len",
                "serve.num_candidates", "data.num_users", "data.num_items"]
    for key in positive:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(getattr(cfg, section), name)}")
    if cfg.train.num_steps < 0 or cfg.train.ranker_steps < 0:
        raise ConfigError("train.num_steps and train.ranker_steps must be >= 0")
    _validate_negatives(cfg.train)
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout}")
    if cfg.data.source in ("movielens", "tfds") and not cfg.data.path:
        raise ConfigError(f"data.path is required for data.source={cfg.data.source}; "
                          "pass --set data.path=DIR")


def _validate_negatives(tc: TrainConfig) -> None:
    for name in ("uniform_negatives", "hard_negatives", "mined_negatives"):
        if getattr(tc, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(tc, name)}")
    if tc.mined_negatives:
        ranks = tc.mine_ranks
        if len(ranks) != 2 or not 0 <= ranks[0] < ranks[1]:
            raise ConfigError(f"train.mine_ranks={ranks}: must be two ranks lo,hi with 0 <= lo < hi")
        if ranks[1] - ranks[0] < tc.mined_negatives:
            raise ConfigError(f"train.mine_ranks={ranks} holds fewer than "
                              f"train.mined_negatives={tc.mined_negatives} items")
        if tc.mine_stride < 1:
            raise ConfigError(f"train.mine_stride must be >= 1, got {tc.mine_stride}")
        if tc.mine_every_epochs <= 0:
            raise ConfigError(f"train.mine_every_epochs must be > 0, got {tc.mine_every_epochs}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Rebuilds a Config saved with `to_dict` (e.g. from a manifest)."""
    sections = {}
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(f.default):
            cls = type(f.default)
            hints = typing.get_type_hints(cls)
            known = {k: (tuple(v) if typing.get_origin(hints[k]) is tuple else v)
                     for k, v in d.get(f.name, {}).items() if k in hints}
            sections[f.name] = cls(**known)
    return Config(name=d.get("name", "run"), **sections)


def dumps(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "IndexConfig",
    "MeshConfig",
    "ModelConfig",
    "ServeConfig",
    "TrainConfig",
    "apply_overrides",
    "dumps",
    "from_dict",
    "load",
    "to_dict",
    "validate",
]
