"""Config schema: each section checks its own choices and ranges; files and overrides fail with one line."""

import dataclasses

import pytest

from recsys import config as config_lib
from recsys.config import (
    Config,
    ConfigError,
    DataConfig,
    IndexConfig,
    MeshConfig,
    ModelConfig,
    RankerConfig,
    ServeConfig,
    TrainConfig,
)


@pytest.mark.parametrize("section, field, value", [
    (DataConfig, "source", "parquet"), (DataConfig, "trained_on", "test"),
    (ModelConfig, "history_pooling", "max"), (RankerConfig, "structure", "tower"),
    (RankerConfig, "loss", "hinge"), (RankerConfig, "events", "test"),
    (TrainConfig, "optimizer", "lion"), (TrainConfig, "embedding_optimizer", "sgd"),
    (TrainConfig, "logq_estimate", "oracle"), (TrainConfig, "mined_correction", "x"),
    (IndexConfig, "kind", "faiss"), (ServeConfig, "ordering", "bogus"),
    (ServeConfig, "mmr_similarity", "titles")])
def test_every_choice_field_refuses_a_value_outside_its_literal(section, field, value):
    with pytest.raises(ConfigError, match=rf"^{section.SECTION}\.{field}='{value}': must be one of"):
        section(**{field: value})


@pytest.mark.parametrize("section, field, value", [
    (ServeConfig, "mmr_lambda", 5.0), (ServeConfig, "genre_cap", -3),
    (ServeConfig, "explore_temperature", 0.0), (ServeConfig, "num_candidates", 0),
    (ServeConfig, "filter_year_min", 2**63), (RankerConfig, "folds", 1),
    (RankerConfig, "steps", -1), (TrainConfig, "batch_size", 0), (TrainConfig, "num_steps", -1),
    (TrainConfig, "logq_learning_rate", 0.0), (TrainConfig, "embedding_learning_rate", -1.0),
    (ModelConfig, "dropout", 1.0), (MeshConfig, "data", 0), (MeshConfig, "model", -1),
    (MeshConfig, "device_memory_gib", -2.0), (DataConfig, "history_len", 0)])
def test_out_of_range_values_are_refused_naming_the_field(section, field, value):
    with pytest.raises(ConfigError, match=rf"^{section.SECTION}\.{field}="):
        section(**{field: value})


def test_mined_negatives_need_a_band_that_holds_them():
    with pytest.raises(ConfigError, match="train.mine_ranks"):
        TrainConfig(mined_negatives=8, mine_ranks=(10, 12))
    assert TrainConfig(mined_negatives=2, mine_ranks=(10, 12)).mined_negatives == 2


def test_overrides_are_checked_by_the_section_and_suggest_close_keys():
    cfg = Config()
    assert config_lib.apply_overrides(cfg, ["ranker.steps=7"]).ranker.steps == 7
    assert config_lib.apply_overrides(cfg, ["serve.filter_genres_not=Horror,Drama"]
                                      ).serve.filter_genres_not == ("Horror", "Drama")
    with pytest.raises(ConfigError, match="serve.ordering='best'"):
        config_lib.apply_overrides(cfg, ["serve.ordering=best"])
    with pytest.raises(ConfigError, match="did you mean train.num_steps"):
        config_lib.apply_overrides(cfg, ["train.num_step=3"])
    with pytest.raises(ConfigError, match="did you mean ranker"):
        config_lib.apply_overrides(cfg, ["rankr.steps=3"])


def test_fields_checked_together_may_be_overridden_in_any_order():
    """The TFRS tutorial's towers: output_layer=false is only valid with hidden_dims=(), and the
    overrides apply as one change of the section, whichever comes first."""
    want = ["model.output_layer=false", "model.hidden_dims=()", "model.use_features=false",
            "model.history_pooling=none"]
    for overrides in (want, want[::-1]):
        model = config_lib.apply_overrides(Config(), overrides).model
        assert not model.output_layer and model.hidden_dims == ()
    assert config_lib.apply_overrides(Config(), ["train.num_steps=3", "train.num_steps=9"]
                                      ).train.num_steps == 9  # the last value wins
    with pytest.raises(ConfigError, match=r"model.output_layer=False: false needs model.hidden_dims"):
        config_lib.apply_overrides(Config(), ["model.output_layer=false"])  # hidden_dims (64,)


def test_serve_filters_are_typed_and_give_the_request_form():
    serve = ServeConfig(filter_genres_not=("Horror",), filter_year_min=1990)
    assert serve.filters() == {"genres_not": ["Horror"], "year_min": 1990}
    assert ServeConfig().filters() == {}


def test_config_round_trips_through_a_dict_and_ignores_unknown_keys():
    cfg = dataclasses.replace(Config(), ranker=RankerConfig(hidden_dims=(8, 4), steps=3))
    d = config_lib.to_dict(cfg)
    d["model"]["ranker_steps"] = 5  # a key of an older schema
    assert config_lib.from_dict(d) == cfg


@pytest.mark.parametrize("text, message", [
    ("def get_config(:\n", "syntax error at line 1"),
    ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ("from recsys.config import *\ndef get_config():\n    return Config(train=TrainConfig(ranker_steps=3))\n",
     "TypeError"),
    ("x = 1\n", "has no get_config"),
    ("def get_config():\n    return 3\n", "returned int")])
def test_a_broken_config_file_is_one_config_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "broken.py"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        config_lib.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
