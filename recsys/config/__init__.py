"""Typed run configuration: frozen dataclass sections (sections.py), Python config files and
dotted overrides (loading.py), and the `recsys config` listing (listing.py)."""

from recsys.config.listing import listing
from recsys.config.loading import apply_overrides, dumps, from_dict, load, to_dict, validate
from recsys.config.sections import (
                                    NUM_YEAR_BUCKETS,
                                    Config,
                                    ConfigError,
                                    DataConfig,
                                    EvalConfig,
                                    ExportConfig,
                                    IndexConfig,
                                    MeshConfig,
                                    ModelConfig,
                                    RankerConfig,
                                    ServeConfig,
                                    TrainConfig,
)

__all__ = ["NUM_YEAR_BUCKETS", "Config", "ConfigError", "DataConfig", "EvalConfig",
           "ExportConfig", "IndexConfig", "MeshConfig", "ModelConfig", "RankerConfig",
           "ServeConfig", "TrainConfig", "apply_overrides", "dumps", "from_dict", "listing",
           "load", "to_dict", "validate"]
