"""Multi-host: 2 processes x 4 CPU devices through launch/local.py; checkpoints restore anywhere."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from recsys import config as config_lib
from recsys import pipeline, sharding
from recsys.train import checkpoint
from recsys.train import state as state_lib
from recsys.train.loop import state_parts, vocabularies

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
STEPS = 6
OVERRIDES = [f"train.num_steps={STEPS}", "ranker.steps=0", "mesh.data=4", "mesh.model=2"]


def tiny(*overrides: str) -> config_lib.Config:
    return config_lib.apply_overrides(config_lib.load(TINY), list(overrides))


def run_launcher(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Runs launch/local.py; past `timeout` it is stopped with SIGTERM, which stops its children."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["TQDM_DISABLE"] = "1"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "local.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # only our launcher; it ends only its own children
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"2-process run did not finish in {timeout} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mp")
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    result = run_launcher(["--num-processes", "2", "--devices-per-process", "4", "--timeout", "240",
                           "--", "recsys", "train", "--config", str(TINY), "--workdir", str(workdir),
                           *sets], timeout=300)
    assert result.returncode == 0, result.stdout[-5000:]
    return workdir, result.stdout


def reported_losses(output: str) -> dict:
    """rank -> train/final_loss from each process's printed metrics."""
    return {int(rank): float(loss) for rank, loss in
            re.findall(r"^\[(\d+)\]\s+\"train/final_loss\": ([-\d.e]+)", output, re.MULTILINE)}


def abstract_target(cfg: config_lib.Config, mesh):
    vocab = vocabularies(pipeline.load_data(cfg.data))
    return state_lib.abstract(*state_parts(cfg, vocab), cfg.train.seed, mesh)[1]


def restore(directory: pathlib.Path, target):
    mngr = checkpoint.make_manager(directory, config_lib.TrainConfig())
    state, meta = checkpoint.restore_or_none(mngr, target, {})
    mngr.close()
    return state, meta


def mesh_of(data: int, model: int, devices=None):
    return sharding.make_mesh(config_lib.MeshConfig(data=data, model=model), devices=devices)


def host_values(state) -> list[np.ndarray]:
    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)
    return [one(x) for x in jax.tree.leaves(state)]


def test_two_processes_train_together_and_write_one_metrics_file(two_process_run):
    workdir, output = two_process_run
    losses = reported_losses(output)
    assert set(losses) == {0, 1} and losses[0] == losses[1], output[-3000:]
    metrics_files = list(workdir.rglob("metrics.json"))
    assert metrics_files == [workdir / "metrics.json"]
    assert json.loads(metrics_files[0].read_text())["train/steps"] == STEPS
    assert "memory plan" in output and output.count("memory plan") == 1  # process 0 only


def test_two_process_checkpoint_restores_in_one_process_and_training_continues(
        two_process_run, tmp_path):
    workdir, _ = two_process_run
    cfg = tiny(*OVERRIDES)
    ckpt = workdir / "checkpoints" / "retrieval"
    one_device = abstract_target(cfg, mesh_of(1, 1, jax.devices()[:1]))
    # 2 processes x (4, 2) -> 1 process on 1 device and on a (2, 4) mesh: the same values.
    one, meta = restore(ckpt, one_device)
    other, _ = restore(ckpt, abstract_target(cfg, mesh_of(2, 4)))
    assert meta["step"] == STEPS
    for a, b in zip(host_values(one), host_values(other)):
        np.testing.assert_array_equal(a, b)
    # One process resumes the 2-process run; it ends where one process going straight ends.
    more = [*OVERRIDES[1:], f"train.num_steps={STEPS + 2}"]
    resumed = pipeline.train(tiny(*more), workdir)
    straight = pipeline.train(tiny(*more), tmp_path)
    assert resumed["train/steps"] == STEPS + 2
    np.testing.assert_allclose(resumed["train/final_loss"], straight["train/final_loss"], rtol=1e-5)
    got, _ = restore(ckpt, one_device)
    want, _ = restore(tmp_path / "checkpoints" / "retrieval", one_device)
    for a, b in zip(host_values(got), host_values(want)):
        np.testing.assert_allclose(a, b, atol=2e-4)  # Adam amplifies summation-order noise


@pytest.mark.parametrize("overrides", [
    [], ["train.embedding_optimizer=lazy_adam", "train.logq_estimate=streaming"]])
def test_checkpoint_restores_onto_other_meshes_with_equal_values(tmp_path, overrides):
    cfg = tiny(*overrides)
    state = _random_state(abstract_target(cfg, mesh_of(4, 2)))
    mngr = checkpoint.make_manager(tmp_path, cfg.train)
    checkpoint.save(mngr, 3, state, {"step": 3})
    checkpoint.wait(mngr)
    mngr.close()
    want = host_values(state)
    for target_mesh in (mesh_of(2, 4), mesh_of(1, 1, jax.devices()[:1])):
        target = abstract_target(cfg, target_mesh)
        restored, meta = restore(tmp_path, target)
        assert meta["step"] == 3
        for got, exp, t in zip(jax.tree.leaves(restored), want, jax.tree.leaves(target)):
            assert got.sharding == t.sharding and got.shape == t.shape
        for got, exp in zip(host_values(restored), want):
            np.testing.assert_array_equal(got, exp)
    table = next(x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
                 if "item_table" in jax.tree_util.keystr(p))
    assert table.addressable_shards[0].data.shape == (table.shape[0] // 8, table.shape[1])


def _random_state(abstract):
    """Distinct random values (nonzero optimizer state too) with the abstract state's shardings."""
    rng = np.random.default_rng(0)

    def fill(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(int(rng.integers(1 << 30))), x.sharding)
        values = rng.standard_normal(x.shape) if np.issubdtype(x.dtype, np.floating) else \
            rng.integers(0, 1000, x.shape)
        return jax.device_put(np.asarray(values, x.dtype), x.sharding)

    return jax.tree.map(fill, abstract)
