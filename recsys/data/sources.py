"""Picks the data source named by the config and returns its RawData."""

from __future__ import annotations

from recsys.config import DataConfig
from recsys.data import events, movielens, synthetic
from recsys.data.schema import RawData


def load_raw(cfg: DataConfig) -> RawData:
    """Reads or generates the interactions `cfg.source` names.

    synthetic: `synthetic.generate(cfg)`; movielens: the MovieLens directory `cfg.path`;
    tfds: the dataset `cfg.tfds_name` written by `tfds_source.prepare` under `cfg.path`;
    events: Parquet or CSV files (`cfg.path`, a file, directory or glob) with the column
    mapping and optional item and user tables of `cfg` (`events.read`).

    Raises:
      DataError: whatever the source cannot read (DataConfig has already refused unknown
        sources).
    """
    if cfg.source == "synthetic":
        return synthetic.generate(cfg)
    if cfg.source == "movielens":
        return movielens.read(cfg.path)
    if cfg.source == "events":
        return events.read(cfg)
    from recsys.data import tfds_source  # imports tensorflow_datasets: only when asked

    return tfds_source.read(cfg.path, cfg.tfds_name)
