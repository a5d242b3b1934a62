"""A command line people can discover: --version, help written for users, `recsys config`."""

import argparse
import dataclasses
import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest

from recsys import cli
from recsys import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_version_is_the_installed_one(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"recsys {importlib.metadata.version('recsys')}"


def test_version_from_the_command_line():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "recsys", "--version"], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"recsys {importlib.metadata.version('recsys')}"


def test_top_level_help_is_for_users(capsys):
    text = _help(capsys)
    assert cli.__doc__.strip() not in text  # the module docstring is for developers
    assert "start here:" in text and "recsys pipeline --config" in text
    for name in _commands():
        assert f"\n    {name}" in text, name  # listed with its one-line summary


@pytest.mark.parametrize("name", sorted(cli.HELP))
def test_each_command_says_what_it_does_writes_and_an_example(capsys, name):
    text = _help(capsys, name)
    description, example = cli.HELP[name]
    assert description.splitlines()[0] in text
    assert any(word in description for word in ("Writes", "writes", "Prints")), name
    assert f"example:\n  {example}" in text and example.startswith(f"recsys {name} "), text


def test_every_command_has_a_help_entry():
    assert set(_commands()) == set(cli.HELP)


def _config_lines(capsys, *overrides) -> list[str]:
    argv = ["config", "--config", TINY]
    for item in overrides:
        argv += ["--set", item]
    assert cli.main(argv) == 0
    return capsys.readouterr().out.splitlines()


def _line(lines: list[str], section: str, name: str) -> str:
    start = lines.index(next(x for x in lines if x.startswith(f"[{section}]")))
    return next(x for x in lines[start + 1:] if x[2:].split(" ")[0] == name)


def test_config_prints_every_field_with_value_default_and_comment(capsys):
    lines = _config_lines(capsys, "train.num_steps=7")
    cfg = config_lib.Config()
    for section in (f.name for f in dataclasses.fields(cfg) if f.name != "name"):
        assert any(x.startswith(f"[{section}]") for x in lines), section
        for f in dataclasses.fields(getattr(cfg, section)):
            _line(lines, section, f.name)  # present, one line
    changed = _line(lines, "train", "num_steps")
    assert changed.startswith("* ") and " 7 " in changed and "default 500" in changed
    assert changed.endswith("retrieval training steps")
    same = _line(lines, "train", "learning_rate")
    assert same.startswith("  ") and "default 0.01" in same and "peak learning rate" in same
    assert _line(lines, "data", "num_users").startswith("* ")  # configs/tiny.py changes it
    # A comment above the field, and one continued on the next line.
    assert _line(lines, "model", "history_pooling").endswith("(the query tower reads no history: ids and features only)")
    assert _line(lines, "ranker", "use_ids").endswith("one training event (events=validation)")


def test_config_with_an_unknown_key_suggests_the_closest(capsys):
    assert cli.main(["config", "--config", TINY, "--set", "train.num_stepz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean train.num_steps?" in err[0], err


@pytest.mark.parametrize("k", ["0", "-3"])
def test_serve_refuses_k_below_one_before_loading_anything(tmp_path, capsys, k):
    missing = tmp_path / "no-artifacts"
    assert cli.main(["serve", "--artifacts", str(missing), "--user", "1", f"--k={k}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"recsys serve: error: --k {k}: must be a positive number of items"], err
