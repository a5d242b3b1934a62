"""The memory plan: its arithmetic on the tiny config, from the real shapes and shardings."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from recsys import config as config_lib
from recsys import pipeline, plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"


@pytest.fixture(scope="module")
def dataset():
    return pipeline.load_data(config_lib.load(TINY).data)


def plan_of(ds, *overrides):
    cfg = config_lib.apply_overrides(config_lib.load(TINY), ["mesh.data=4", "mesh.model=2",
                                                             *overrides])
    return plan.for_dataset(cfg, ds, plan.planning_mesh(cfg.mesh)), cfg


def test_table_bytes_per_device_are_the_table_over_its_row_shards(dataset):
    p, cfg = plan_of(dataset)
    rows = {r.name: r for r in p.rows}
    e = cfg.model.embed_dim
    for name, vocab in (("item_table", dataset.items.size), ("user_table", dataset.users.size)):
        r = rows[name]
        padded = -(-vocab // 128) * 128
        assert r.shape == (padded, e) and r.row_shards == 8
        assert r.param_bytes == padded * e * 4 // r.row_shards
        assert r.opt_bytes == 2 * r.param_bytes  # Adam: mu and nu, sharded like the table
    # 64 examples over 8 devices; logits 64 x 64 f32, three copies.
    assert p.batch_rows == 8 and p.logits_shape == (64, 64)
    assert p.logits_bytes == 3 * 8 * 64 * 4
    state = sum(r.param_bytes + r.opt_bytes for r in p.rows)
    assert p.total_bytes == state + p.activation_bytes + p.logits_bytes


def test_sparse_optimizer_state_and_extra_negatives_change_the_plan(dataset):
    p, _ = plan_of(dataset, "train.embedding_optimizer=rowwise_adagrad",
                   "train.logq_estimate=streaming", "train.uniform_negatives=32")
    rows = {r.name: r for r in p.rows}
    item = rows["item_table"]
    assert item.opt_bytes == item.shape[0] // 8 * 4  # one accumulator per row
    assert any(r.name == "logq" and r.row_shards == 8 for r in p.rows)
    assert p.logits_shape == (64, 96) and p.logits_bytes == 3 * 8 * 96 * 4


def test_fit_is_judged_against_the_configured_device_memory(dataset):
    small, _ = plan_of(dataset, "mesh.device_memory_gib=0.00001")
    big, _ = plan_of(dataset, "mesh.device_memory_gib=1")
    assert small.fits is False and big.fits is True and big.device_bytes == 2**30
    text = plan.format_plan(small)
    assert "DOES NOT FIT" in text and "item_table" in text and "rows / 8" in text


def test_plan_on_one_device_keeps_whole_tables(dataset):
    cfg = config_lib.load(TINY)
    p = plan.for_dataset(cfg, dataset, plan.planning_mesh(config_lib.MeshConfig(data=1, model=1)))
    item = next(r for r in p.rows if r.name == "item_table")
    assert item.row_shards == 1 and item.param_bytes == int(np.prod(item.shape)) * 4


def test_recsys_plan_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    ok = subprocess.run([sys.executable, "-m", "recsys", "plan", "--config", str(TINY),
                         "--set", "mesh.data=16", "--set", "mesh.model=2", "--device-memory", "16"],
                        capture_output=True, text=True, env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "32 devices" in ok.stdout and "rows / 32" in ok.stdout and "fits" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "recsys", "plan", "--config", str(TINY),
                          "--set", "mesh.data=3"], capture_output=True, text=True, env=env,
                         check=False)
    assert bad.returncode == 2 and "train.batch_size=64" in bad.stderr.strip().splitlines()[-1]


def test_plan_for_a_catalogue_size_reads_no_data(capsys):
    from recsys import cli
    args = ["plan", "--config", str(TINY), "--set", "mesh.data=16", "--set", "mesh.model=8",
            "--set", "train.batch_size=1024",
            "--device-memory", "16", "--num-items", "100000000", "--num-users", "2000"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "100000128 x 16, rows / 128" in out and "128 devices" in out  # + row 0, padded
    assert cli.main(args[:-2]) == 2  # --num-items without --num-users
