"""Picks the data source named by the config and returns its RawData."""

from __future__ import annotations

from recsys.config import DataConfig
from recsys.data import movielens, synthetic
from recsys.data.schema import DataError, RawData

SOURCES = ("synthetic", "movielens", "tfds")


def load_raw(cfg: DataConfig) -> RawData:
    """Reads or generates the interactions `cfg.source` names.

    synthetic: `synthetic.generate(cfg)`; movielens: the MovieLens directory `cfg.path`;
    tfds: the dataset `cfg.tfds_name` written by `tfds_source.prepare` under `cfg.path`.

    Raises:
      DataError: for an unknown source, or whatever the source cannot read.
    """
    if cfg.source == "synthetic":
        return synthetic.generate(cfg)
    if cfg.source == "movielens":
        return movielens.read(cfg.path)
    if cfg.source == "tfds":
        from recsys.data import tfds_source  # imports tensorflow_datasets: only when asked

        return tfds_source.read(cfg.path, cfg.tfds_name)
    raise DataError(f"data.source={cfg.source!r}: must be one of {', '.join(SOURCES)}")
