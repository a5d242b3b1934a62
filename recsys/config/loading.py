"""Config files, `section.field=value` overrides, checks across sections, and the JSON form."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import typing
from typing import Any, Literal

from recsys.config.sections import Config, ConfigError


def load(path: str | pathlib.Path) -> Config:
    """Runs `get_config()` from a Python config file (validated once overrides are applied).

    A config file is Python and runs as code, like big_vision's and Flax's: load only files you
    trust. Any error it raises becomes one ConfigError line naming the file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"recsys_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path} has no get_config() function")
        cfg = module.get_config()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
    except SyntaxError as e:
        raise ConfigError(f"config file {path}: syntax error at line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 (the file is user code: any error is the user's)
        raise ConfigError(f"config file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not recsys Config")
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Applies `section.field=value` strings, coercing each value to the field's type.

    A section's fields change together (then its checks run once), so fields checked against
    each other (model.output_layer and model.hidden_dims) may come in any order; a field given
    twice keeps the last value.
    """
    changes: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        section_name, field_name = parts
        section = getattr(cfg, section_name, None)
        if not dataclasses.is_dataclass(section):
            raise ConfigError(f"unknown config section {section_name!r} in {item!r}"
                              f"{_did_you_mean(section_name, _section_names())}; "
                              f"sections: {', '.join(_section_names())}")
        hints = typing.get_type_hints(type(section))
        names = [f.name for f in dataclasses.fields(section)]
        if field_name not in names:
            raise ConfigError(f"unknown config key {key!r}"
                              f"{_did_you_mean(field_name, names, section_name + '.')}; "
                              f"{section_name} has: {', '.join(names)}")
        changes.setdefault(section_name, {})[field_name] = _coerce(key, text.strip(),
                                                                   hints[field_name])
    for section_name, fields in changes.items():
        section = dataclasses.replace(getattr(cfg, section_name), **fields)
        cfg = dataclasses.replace(cfg, **{section_name: section})
    validate(cfg)
    return cfg


def _did_you_mean(name: str, known: list[str], prefix: str = "") -> str:
    import difflib
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default)]


def _coerce(key: str, text: str, hint: Any) -> Any:
    try:
        if typing.get_origin(hint) is Literal:
            return text  # the section checks the choice
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
    """Checks that need more than one field of a section (each section checks its own)."""
    if cfg.data.source in ("movielens", "tfds", "events") and not cfg.data.path:
        raise ConfigError(f"data.path is required for data.source={cfg.data.source}; "
                          "pass --set data.path=DIR")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Rebuilds a Config saved with `to_dict` (e.g. from a manifest); unknown keys are ignored."""
    sections = {}
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(f.default):
            cls = type(f.default)
            hints = typing.get_type_hints(cls)
            known = {k: (tuple(v) if typing.get_origin(hints[k]) is tuple else v)
                     for k, v in d.get(f.name, {}).items() if k in hints and k != "SECTION"}
            sections[f.name] = cls(**known)
    return Config(name=d.get("name", "run"), **sections)


def dumps(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)

