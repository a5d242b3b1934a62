"""The `recsys` command: user errors end in one line naming the problem and exit code 2."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def recsys(*args, cwd=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["TQDM_DISABLE"] = "1"
    return subprocess.run([sys.executable, "-m", "recsys", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout, check=False)


def assert_user_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("recsys "), last
    for needle in needles:
        assert needle in last, last


@pytest.mark.parametrize("override, needles", [
    ("train.no_such_key=1", ["train.no_such_key"]),
    ("nosection.x=1", ["nosection"]),
    ("train.num_steps=many", ["train.num_steps", "int"]),
    ("model.history_pooling=max", ["model.history_pooling", "mean"]),
    ("data.source=movielens", ["data.path"]),
])
def test_bad_config_overrides(tmp_path, override, needles):
    assert_user_error(recsys("train", "--config", TINY, "--workdir", str(tmp_path),
                             "--set", override), *needles)


def test_missing_config_file(tmp_path):
    assert_user_error(recsys("train", "--config", "nope.py", "--workdir", str(tmp_path)), "nope.py")


def test_missing_data_path_and_unknown_layout(tmp_path):
    missing = tmp_path / "missing"
    assert_user_error(recsys("train", "--config", TINY, "--workdir", str(tmp_path / "w"),
                             "--set", "data.source=movielens", "--set", f"data.path={missing}"),
                      str(missing))
    (tmp_path / "empty").mkdir()
    assert_user_error(recsys("train", "--config", TINY, "--workdir", str(tmp_path / "w"),
                             "--set", "data.source=movielens",
                             "--set", f"data.path={tmp_path / 'empty'}"), "ratings.csv")


def test_file_without_expected_columns(tmp_path):
    data = tmp_path / "ml"
    data.mkdir()
    (data / "ratings.csv").write_text("userId,itemId,rating,timestamp\n1,2,3.0,4\n")
    (data / "movies.csv").write_text("movieId,title,genres\n2,Toy (1995),Comedy\n")
    assert_user_error(recsys("train", "--config", TINY, "--workdir", str(tmp_path / "w"),
                             "--set", "data.source=movielens", "--set", f"data.path={data}"),
                      "ratings.csv", "movieId")


def test_empty_dataset_after_filtering(tmp_path):
    data = tmp_path / "ml"
    data.mkdir()
    (data / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,3.0,4\n1,3,3.0,5\n")
    (data / "movies.csv").write_text("movieId,title,genres\n2,A (1995),Comedy\n3,B (1996),Drama\n")
    workdir = tmp_path / "w"
    assert_user_error(recsys("train", "--config", TINY, "--workdir", str(workdir),
                             "--set", "data.source=movielens", "--set", f"data.path={data}"),
                      "min_user_events")
    assert not (workdir / "metrics.json").exists()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_workdir_that_is_a_file(tmp_path, command):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for workdir in (afile, afile / "run"):
        assert_user_error(recsys(command, "--config", TINY, "--workdir", str(workdir)),
                          str(afile), "not a directory")


@pytest.mark.e2e
def test_eval_and_export_never_train_an_unfinished_checkpoint(tmp_path):
    workdir = tmp_path / "w"
    assert_user_error(recsys("eval", "--config", TINY, "--workdir", str(workdir)),
                      "no usable checkpoint", "recsys train")
    assert not workdir.exists()
    short = ["--set", "ranker.steps=0", "--set", "train.num_steps=4"]
    ok = recsys("train", "--config", TINY, "--workdir", str(workdir), *short)
    assert ok.returncode == 0, ok.stderr
    before = json.loads((workdir / "metrics.json").read_text())
    for command in ("eval", "export"):  # asked for 8 steps: the 4-step checkpoint is incomplete
        assert_user_error(recsys(command, "--config", TINY, "--workdir", str(workdir), *short,
                                 "--set", "train.num_steps=8"),
                          "incomplete", "step 4 of train.num_steps=8", "recsys train")
    assert [p.name for p in (workdir / "checkpoints" / "retrieval").iterdir()] == ["4"]
    assert json.loads((workdir / "metrics.json").read_text()) == before
    assert not (workdir / "artifacts").exists()
    # With a ranker asked for, the missing ranker checkpoint is named.
    assert_user_error(recsys("eval", "--config", TINY, "--workdir", str(workdir),
                             "--set", "train.num_steps=4"), "checkpoints/ranker")


@pytest.mark.e2e
def test_checkpoint_of_another_shape_and_serving_from_the_cli(tmp_path):
    workdir = str(tmp_path / "w")
    ok = recsys("pipeline", "--config", TINY, "--workdir", workdir,
                "--set", "train.num_steps=4", "--set", "ranker.steps=2")
    assert ok.returncode == 0, ok.stderr
    assert "pipeline/hr@10" in ok.stdout and "sample: recsys serve" in ok.stdout
    assert_user_error(recsys("train", "--config", TINY, "--workdir", workdir,
                             "--set", "model.embed_dim=8"), "checkpoint", "embed_dim")
    served = recsys("serve", "--artifacts", f"{workdir}/artifacts", "--user", "3", "--k", "4")
    assert served.returncode == 0, served.stderr
    assert served.stdout.count("\n") >= 5 and "timings (ms)" in served.stdout
    assert_user_error(recsys("serve", "--artifacts", f"{workdir}/artifacts", "--user", "3",
                             "--k", "0"), "k")
    assert_user_error(recsys("serve", "--artifacts", str(tmp_path / "nothing"), "--user", "3"),
                      "nothing")


@pytest.mark.parametrize("damage, command", [
    (lambda text: text[:len(text) // 2], "serve"),  # truncated
    (lambda text: "\udcff" + text, "index"),  # not UTF-8
    (lambda text: json.dumps([json.loads(text)]), "serve"),  # JSON, but not an object
])
def test_a_damaged_manifest_is_one_line(tiny_run, tmp_path, damage, command):
    import shutil

    from recsys import artifacts
    version = tmp_path / "bundle"
    shutil.copytree(artifacts.published(tiny_run[0] / artifacts.ROOT), version)
    manifest = version / artifacts.MANIFEST
    manifest.write_bytes(damage(manifest.read_text()).encode("utf-8", "surrogateescape"))
    args = ["--user", "1"] if command == "serve" else []
    assert_user_error(recsys(command, "--artifacts", str(version), *args), artifacts.MANIFEST)


def test_a_config_file_with_a_syntax_error_is_one_line(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("def get_config(:\n    pass\n")
    assert_user_error(recsys("train", "--config", str(config), "--workdir", str(tmp_path / "w")),
                      str(config), "syntax error")
