"""Test session setup: 8 fake CPU devices (before any JAX backend starts) and shared paths."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TQDM_DISABLE", "1")

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)

ROOT = pathlib.Path(__file__).resolve().parents[1]
MOVIELENS_SMALL = ROOT.parent / "shared" / "data" / "ml-latest-small"


@pytest.fixture
def movielens_small() -> pathlib.Path:
    """The real ml-latest-small directory beside the checkout (skipped when absent)."""
    if not (MOVIELENS_SMALL / "ratings.csv").is_file():
        pytest.skip(f"real MovieLens data not found at {MOVIELENS_SMALL}")
    return MOVIELENS_SMALL


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One end-to-end pipeline run on configs/tiny.py, shared by the pipeline and serving tests."""
    from recsys import config as config_lib
    from recsys import pipeline
    workdir = tmp_path_factory.mktemp("tiny")
    metrics = pipeline.run(config_lib.load(ROOT / "configs" / "tiny.py"), workdir)
    return workdir, metrics
