"""Test session setup: 8 fake CPU devices (before any JAX backend starts) and shared paths."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

ROOT = pathlib.Path(__file__).resolve().parents[1]
MOVIELENS_SMALL = ROOT.parent / "shared" / "data" / "ml-latest-small"


@pytest.fixture
def movielens_small() -> pathlib.Path:
    """The real ml-latest-small directory beside the checkout (skipped when absent)."""
    if not (MOVIELENS_SMALL / "ratings.csv").is_file():
        pytest.skip(f"real MovieLens data not found at {MOVIELENS_SMALL}")
    return MOVIELENS_SMALL
