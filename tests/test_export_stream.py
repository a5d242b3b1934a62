"""Streamed export: item vectors computed and written block by block, the index built from the file."""

import hashlib
import os

import jax
import numpy as np
import pytest
from flax import nnx

from recsys import artifacts, export, sharding
from recsys.config import Config, DataConfig, IndexConfig, MeshConfig, ModelConfig
from recsys.data import dataset as dataset_lib
from recsys.data.synthetic import generate
from recsys.eval import protocol
from recsys.index import ExactSearcher
from recsys.models.two_tower import TwoTower
from recsys.serve import artifacts as serve_artifacts
from recsys.train.loop import vocabularies

BATCH, ROWS = 8, 20  # tower rows per call, rows per written block: both below the catalogue


@pytest.fixture(scope="module")
def tiny():
    """An untrained two-tower model with a hidden layer over a 60-item catalogue."""
    cfg = Config(data=DataConfig(num_users=30, num_items=60, interactions_per_user=6,
                                 num_clusters=2, num_genres=3, history_len=4),
                 model=ModelConfig(embed_dim=8, hidden_dims=(16,), out_dim=4, time_features=True),
                 index=IndexConfig(kind="scann"))
    ds = dataset_lib.build(generate(cfg.data), cfg.data)
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        two_tower = TwoTower(cfg.model, vocabularies(ds), nnx.Rngs(0))
    return cfg, ds, two_tower


def _export(tiny, root, item_vectors):
    cfg, ds, two_tower = tiny
    return export.export_artifacts(root, cfg=cfg, ds=ds, two_tower=two_tower,
                                   item_vectors=item_vectors)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_streamed_export_writes_the_in_memory_vectors(tiny, tmp_path, monkeypatch):
    _, ds, two_tower = tiny
    monkeypatch.setattr(export, "WRITE_ROWS", ROWS)
    in_memory = protocol.item_vectors(two_tower, ds.features)  # [V, D], the evaluation's
    num_rows = len(in_memory)
    assert num_rows > 3 * ROWS and ROWS > BATCH  # several blocks, several tower calls each

    # An array streamed through the writer is copied bit for bit: the same .npy file as np.save.
    version, _ = _export(tiny, tmp_path / "a", in_memory)
    np.save(tmp_path / "saved.npy", in_memory)
    assert _sha256(version / artifacts.ITEM_VECTORS) == _sha256(tmp_path / "saved.npy")

    # Computed by the tower in blocks: the evaluation's vectors to float rounding. Bit for bit is
    # not promised: XLA's CPU matmul may pick another kernel for another batch shape (8 rows
    # here, V there); at other widths rows differed by up to 3e-7 (unit vectors).
    streamed = export.CandidateVectors(two_tower, ds.features, batch=BATCH)
    assert streamed.shape == in_memory.shape
    version, searcher = _export(tiny, tmp_path / "b", streamed)
    manifest = artifacts.verify(version)  # sealed: sizes and sha256 of every file
    written = serve_artifacts.load(version).item_vectors
    np.testing.assert_allclose(written, in_memory, rtol=0, atol=1e-6)
    assert manifest["checksums"][artifacts.ITEM_VECTORS]["sha256"] == _sha256(
        version / artifacts.ITEM_VECTORS)
    # With the evaluation's batch (one call here: V < protocol.CHUNK) it is bit for bit.
    np.testing.assert_array_equal(export.CandidateVectors(two_tower, ds.features)[:], in_memory)
    # The index was built from the written file (brute force at this size: exact).
    queries = np.random.default_rng(0).standard_normal((5, written.shape[1])).astype(np.float32)
    exact = ExactSearcher(written, np.arange(num_rows) > 0)
    np.testing.assert_array_equal(searcher.search(queries, 5)[1], exact.search(queries, 5)[1])


class _FailingVectors:
    """Vectors whose `fail_at`-th block read raises (a tower or disk failure midway)."""

    def __init__(self, vectors: np.ndarray, fail_at: int):
        self.vectors, self.fail_at, self.reads = vectors, fail_at, 0
        self.shape = vectors.shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        self.reads += 1
        if self.reads == self.fail_at:
            raise RuntimeError("failed midway")
        return self.vectors[rows]


def _versions(root) -> list[str]:
    return sorted(os.listdir(root / artifacts.VERSIONS))


def test_a_failure_midway_publishes_nothing(tiny, tmp_path, monkeypatch):
    _, ds, two_tower = tiny
    monkeypatch.setattr(export, "WRITE_ROWS", ROWS)
    vectors = protocol.item_vectors(two_tower, ds.features)
    root = tmp_path / "artifacts"
    first, _ = _export(tiny, root, vectors)

    failing = _FailingVectors(vectors, fail_at=3)  # two blocks written, then a failure
    with pytest.raises(RuntimeError, match="failed midway"):
        _export(tiny, root, failing)
    assert failing.reads == 3
    assert artifacts.published(root) == first and _versions(root) == [first.name]

    def broken_index(*args, **kwargs):  # every vector written, then the index fails
        raise RuntimeError("index failed")

    monkeypatch.setattr(export, "_build_index", broken_index)
    with pytest.raises(RuntimeError, match="index failed"):
        _export(tiny, root, vectors)
    assert artifacts.published(root) == first and _versions(root) == [first.name]
    artifacts.verify(first)


def test_blocks_of_the_wrong_shape_are_refused_by_name(tmp_path):
    class Short:
        shape = (10, 4)

        def __getitem__(self, rows):
            return np.zeros((3, 4), np.float32)

    with pytest.raises(ValueError, match=r"item_vectors\[0:8\] has shape \(3, 4\), expected"):
        export.write_vectors(tmp_path / "v.npy", Short(), 8)
