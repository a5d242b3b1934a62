"""Training from prepared data (data.prepared): Grain-fed runs compute what in-memory runs do, on
one process or two, and a run killed with SIGKILL resumes to the same end."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from recsys import config as config_lib
from recsys import pipeline
from recsys.data import prepare
from recsys.data.schema import DataError
from recsys.train import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
# sgd: no optimizer state whose summation order could differ between meshes.
BASE = ["ranker.steps=0", "train.optimizer=sgd", "train.learning_rate=0.5", "train.log_every=5"]


def tiny(*overrides: str) -> config_lib.Config:
    return config_lib.apply_overrides(config_lib.load(TINY), [*BASE, *overrides])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> pathlib.Path:
    return prepare.prepare(tiny().data, tmp_path_factory.mktemp("prep") / "tiny", num_shards=3)


def test_grain_fed_training_equals_in_memory_training(prepared, tmp_path, monkeypatch):
    steps = ["train.num_steps=16", "mesh.data=4", "mesh.model=2"]
    memory = pipeline.train(tiny(*steps), tmp_path / "memory")

    def no_events(cfg):
        raise AssertionError("the event log was loaded")

    monkeypatch.setattr(pipeline, "load_data", no_events)  # nothing here needs the events
    grain = pipeline.train(tiny(*steps, f"data.prepared={prepared}"), tmp_path / "grain")
    assert grain["train/steps"] == memory["train/steps"] == 16
    assert grain["train/final_loss"] == memory["train/final_loss"]
    assert {k: grain[k] for k in ("dataset", "num_items", "num_users")} == \
        {k: memory[k] for k in ("dataset", "num_items", "num_users")}
    meta = checkpoint.latest_meta(tmp_path / "grain" / "checkpoints" / "retrieval")
    assert meta["input"]["step"] == 16  # the reader's state, saved with the model


@pytest.mark.parametrize("needs", ["train.eval_every=4", "train.mined_negatives=2"])
def test_validation_or_mining_loads_the_events_beside_the_prepared_examples(
        prepared, tmp_path, monkeypatch, needs):
    loads = []
    real = pipeline.load_data
    monkeypatch.setattr(pipeline, "load_data", lambda cfg: loads.append(cfg) or real(cfg))
    metrics = pipeline.train(tiny("train.num_steps=8", needs, "train.mine_ranks=2,20",
                                  f"data.prepared={prepared}"), tmp_path)
    assert len(loads) == 1 and metrics["train/steps"] == 8
    with pytest.raises(config_lib.ConfigError, match=r"needs the event log"):
        from recsys import sharding
        from recsys.train.loop import train_retrieval
        cfg = tiny("train.num_steps=8", needs, "train.mine_ranks=2,20", f"data.prepared={prepared}")
        train_retrieval(cfg, None, tmp_path / "direct", sharding.make_mesh(cfg.mesh))


def test_prepared_data_from_other_data_fields_is_refused(prepared, tmp_path):
    with pytest.raises(DataError, match=r"prepared with data.num_users=300, but the config has "
                                        r"data.num_users=301"):
        pipeline.train(tiny("train.num_steps=2", "data.num_users=301",
                            f"data.prepared={prepared}"), tmp_path)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(TQDM_DISABLE="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return env


def _sets(*overrides: str) -> list[str]:
    return [a for o in [*BASE, *overrides] for a in ("--set", o)]


def test_two_processes_reading_grain_shards_match_one_process_of_eight_devices(prepared, tmp_path):
    """2 processes x 4 devices, each reading only its rows of every batch from the shards, end
    at the loss of 1 process x 8 devices (to 1e-5)."""
    steps = ["train.num_steps=12", "mesh.data=4", "mesh.model=2"]
    one = pipeline.train(tiny(*steps), tmp_path / "one")
    env = {k: v for k, v in _env().items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "local.py"), "--num-processes", "2",
         "--devices-per-process", "4", "--timeout", "300", "--", "recsys", "train", "--config",
         str(TINY), "--workdir", str(tmp_path / "two"),
         *_sets(*steps, f"data.prepared={prepared}")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=400, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    meta = checkpoint.latest_meta(tmp_path / "two" / "checkpoints" / "retrieval")
    assert meta["step"] == 12
    np.testing.assert_allclose(meta["loss"], one["train/final_loss"], rtol=1e-5)


def test_a_grain_fed_run_killed_with_sigkill_resumes_to_the_same_end(prepared, tmp_path):
    steps = ["train.num_steps=40", "train.checkpoint_every=5", f"data.prepared={prepared}"]
    straight = pipeline.train(tiny(*steps), tmp_path / "straight")
    workdir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "recsys", "train", "--config", str(TINY), "--workdir",
           str(workdir), *_sets(*steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env(), cwd=ROOT)
    ckpts = workdir / "checkpoints" / "retrieval"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        meta = checkpoint.latest_meta(ckpts) if ckpts.is_dir() else None
        if meta is not None and 5 <= meta["step"] < 40:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed (machine too fast)")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest_meta(ckpts)["step"]
    assert killed_at < 40
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT,
                             timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    meta = checkpoint.latest_meta(ckpts)
    assert meta["step"] == 40
    assert meta["loss"] == straight["train/final_loss"]
