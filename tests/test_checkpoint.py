"""Checkpoints: exact resume through the CLI (also after kill -9), atomic saves, refused mismatches."""

import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from recsys import config as config_lib
from recsys import pipeline, sharding
from recsys.models.two_tower import TwoTower
from recsys.train import checkpoint
from recsys.train import state as state_lib
from recsys.train.loop import vocabularies

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
# Dropout on, so the RNG streams in the state matter for exact resumption.
RUN = ["--set", "ranker.steps=0", "--set", "model.dropout=0.1", "--set", "train.log_every=1000"]
STEPS = 60


def recsys_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "recsys", *args]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["TQDM_DISABLE"] = "1"
    return env


def train(workdir, steps: int, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        recsys_cmd("train", "--config", TINY, "--workdir", str(workdir), *RUN,
                   "--set", f"train.num_steps={steps}", *extra),
        capture_output=True, text=True, env=child_env(), timeout=300, check=False)
    return result


def final_loss(workdir) -> float:
    return json.loads((pathlib.Path(workdir) / "metrics.json").read_text())["train/final_loss"]


@functools.cache
def one_device_target():
    """The abstract retrieval state of the runs above, on one device."""
    cfg = config_lib.apply_overrides(config_lib.load(TINY), ["model.dropout=0.1"])
    vocab = vocabularies(pipeline.load_data(cfg))
    mesh = sharding.make_mesh(config_lib.MeshConfig(), devices=jax.devices()[:1])
    return state_lib.abstract(lambda rngs: TwoTower(cfg.model, vocab, rngs),
                              state_lib.make_optimizer(cfg.train), 0, mesh)[1]


def restored_arrays(workdir) -> dict:
    """The latest retrieval checkpoint of `workdir`, restored onto one device, as numpy."""
    mngr = checkpoint.make_manager(pathlib.Path(workdir) / "checkpoints" / "retrieval",
                                   config_lib.TrainConfig())
    restored, meta = checkpoint.restore_or_none(mngr, one_device_target(), {})
    mngr.close()
    leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {jax.tree_util.keystr(p): np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x) for p, x in leaves} | {"step": meta["step"]}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    result = train(workdir, STEPS)
    assert result.returncode == 0, result.stderr
    return workdir


def assert_same_run(workdir, reference):
    assert final_loss(workdir) == pytest.approx(final_loss(reference), rel=1e-6)
    got, want = restored_arrays(workdir), restored_arrays(reference)
    assert got["step"] == want["step"] == STEPS
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.e2e
def test_stop_and_resume_from_the_cli_matches_a_straight_run(straight, tmp_path):
    first = train(tmp_path, STEPS // 2)
    assert first.returncode == 0, first.stderr
    second = train(tmp_path, STEPS)
    assert second.returncode == 0, second.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["train/steps"] == STEPS
    assert_same_run(tmp_path, straight)


@pytest.mark.e2e
def test_resume_after_kill_9_matches_a_straight_run(straight, tmp_path):
    ckpts = tmp_path / "checkpoints" / "retrieval"
    proc = subprocess.Popen(
        recsys_cmd("train", "--config", TINY, "--workdir", str(tmp_path), *RUN,
                   "--set", f"train.num_steps={STEPS}", "--set", "train.checkpoint_every=2"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    try:
        deadline = time.monotonic() + 180
        while not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert done and done[-1] < STEPS
    # Whatever orbax left half-written is not a step; every complete-looking step restores.
    mngr = checkpoint.make_manager(ckpts, config_lib.TrainConfig())
    assert mngr.all_steps() == done
    mngr.close()
    resumed = train(tmp_path, STEPS)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path, straight)


def test_half_written_step_is_ignored_and_cleaned_up(tmp_path):
    tc = config_lib.TrainConfig()
    tree = {"w": np.arange(6, dtype=np.float32)}
    mngr = checkpoint.make_manager(tmp_path, tc)
    checkpoint.save(mngr, 5, tree, {"step": 5})
    checkpoint.wait(mngr)
    mngr.close()
    # What a kill -9 during the save of step 10 leaves: a temporary directory, partly written.
    partial = tmp_path / "10.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(tmp_path / "5", partial)
    shutil.rmtree(partial / "state")
    mngr = checkpoint.make_manager(tmp_path, tc)
    assert mngr.latest_step() == 5
    abstract = {"w": jax.ShapeDtypeStruct((6,), np.float32)}
    state, meta = checkpoint.restore_or_none(mngr, abstract, {})
    assert meta["step"] == 5 and np.array_equal(np.asarray(state["w"]), tree["w"])
    checkpoint.save(mngr, 10, tree, {"step": 10})  # waits for the leftover's removal first
    checkpoint.wait(mngr)
    mngr.close()
    assert not partial.exists() and (tmp_path / "10").is_dir()


@pytest.mark.e2e
def test_checkpoint_for_other_table_sizes_is_refused_in_one_line(straight):
    result = train(straight, STEPS, "--set", "data.num_items=300")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("recsys train: error: checkpoint") and "vocab.num_items" in last, last
    assert "301" in last and "401" in last  # both table sizes (with the padding row)
