"""Sealed, versioned artifacts: round trip, a malicious-bundle suite, atomic publication and GC."""

import dataclasses
import json
import os
import pickle
import shutil
import threading
import traceback

import jax
import numpy as np
import pytest
import scann
from flax import nnx

from recsys import artifacts, sharding
from recsys.artifacts import ArtifactError
from recsys.config import (
    Config,
    DataConfig,
    ExportConfig,
    IndexConfig,
    MeshConfig,
    ModelConfig,
    RankerConfig,
)
from recsys.data import dataset as dataset_lib
from recsys.data.batches import event_query_inputs
from recsys.data.synthetic import generate
from recsys.export import export_artifacts
from recsys.models.ranker import Ranker
from recsys.models.two_tower import TwoTower
from recsys.serve import artifacts as serve_artifacts
from recsys.train.loop import vocabularies

D = 4


@pytest.fixture(scope="module")
def tiny():
    """Untrained towers and ranker over a 40-item synthetic catalogue (exports in ~0.2 s)."""
    cfg = Config(data=DataConfig(num_users=30, num_items=40, interactions_per_user=6,
                                 num_clusters=2, num_genres=3, history_len=4),
                 model=ModelConfig(embed_dim=4, hidden_dims=(), out_dim=D, time_features=True),
                 ranker=RankerConfig(embed_dim=4, hidden_dims=(4,)), index=IndexConfig(kind="scann"))
    ds = dataset_lib.build(generate(cfg.data), cfg.data)
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        two_tower = TwoTower(cfg.model, vocabularies(ds), nnx.Rngs(0))
        ranker = Ranker(cfg.ranker, vocabularies(ds), ds.history_len, nnx.Rngs(1), vector_dim=D,
                        temperature=0.05)
    return cfg, ds, two_tower, ranker, mesh


def vectors(ds, generation: int) -> np.ndarray:
    return np.random.default_rng(generation).standard_normal((ds.items.size, D)).astype(np.float32)


def export(tiny, root, generation=0, keep_versions=3):
    cfg, ds, two_tower, ranker, _ = tiny
    cfg = dataclasses.replace(cfg, export=ExportConfig(keep_versions=keep_versions))
    return export_artifacts(root, cfg=cfg, ds=ds, two_tower=two_tower,
                            item_vectors=vectors(ds, generation), ranker=ranker,
                            manifest={"generation": generation})[0]


@pytest.fixture(scope="module")
def published(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("published") / "artifacts"
    return root, export(tiny, root)


@pytest.fixture
def bundle(published, tmp_path):
    """A private copy of the published version: tests tamper with it."""
    copy = tmp_path / "bundle"
    shutil.copytree(published[1], copy)
    return copy


@pytest.fixture
def outside(tmp_path):
    """A directory beside the bundle, holding what an attacker would point at."""
    out = tmp_path / "outside"
    out.mkdir()
    return out


def reseal(directory):
    """Rewrites the manifest to match the files, as someone with write access could."""
    artifacts.seal(directory, json.loads((directory / artifacts.MANIFEST).read_text()))


def refused(path, match):
    with pytest.raises(ArtifactError, match=match) as err:
        serve_artifacts.load(path)
    return str(err.value)


def entry(path):
    return {"size": path.stat().st_size, "sha256": artifacts.sha256(path)}


def edit_manifest(directory, change):
    path = directory / artifacts.MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


# ---- the sealed bundle ---------------------------------------------------------------------


def test_export_publishes_a_sealed_version_that_loads_from_the_root_or_itself(tiny, published):
    _, ds, two_tower, _, mesh = tiny
    root, version = published
    assert os.readlink(root / artifacts.CURRENT) == f"{artifacts.VERSIONS}/{version.name}"
    assert sorted(os.listdir(root)) == [artifacts.CURRENT, artifacts.VERSIONS]
    manifest = artifacts.verify(version)
    assert manifest["format_version"] == artifacts.FORMAT_VERSION
    assert manifest["recsys_version"] == artifacts.recsys_version()
    files = sorted(str(p.relative_to(version)) for p in version.rglob("*") if p.is_file())
    assert sorted(manifest["checksums"]) == [f for f in files if f != artifacts.MANIFEST]
    assert manifest["checksums"][artifacts.ITEM_VECTORS] == entry(version / artifacts.ITEM_VECTORS)
    for path in (root, version, root / artifacts.CURRENT):
        loaded = serve_artifacts.load(path)
        assert loaded.manifest == manifest
        np.testing.assert_array_equal(loaded.item_vectors, vectors(ds, 0))
    x = event_query_inputs(ds, np.arange(3))
    with jax.set_mesh(mesh):
        two_tower.eval()
        want = np.asarray(two_tower.embed_query(x))
    np.testing.assert_allclose(np.asarray(loaded.query_fn(loaded.query_params, x)), want,
                               atol=1e-5)


class _CreatesMarker:
    """Unpickling this creates a file: the stand-in for code an attacker's pickle would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickle_dropped_into_the_index_never_runs(bundle, outside):
    marker = outside / "pickle-ran"
    scann_dir = bundle / artifacts.INDEX_DIR / "scann"
    (scann_dir / "scann_docids.pkl").write_bytes(pickle.dumps(_CreatesMarker(marker)))
    # The payload is live: ScaNN's own loader runs it (on a copy; it then fails on the result).
    with pytest.raises(Exception):  # noqa: B017
        scann.scann_ops_pybind.load_searcher(str(shutil.copytree(scann_dir, outside / "scann")))
    assert marker.exists()
    marker.unlink()
    refused(bundle, "index/scann/scann_docids.pkl is not listed")
    reseal(bundle)  # listed now, as if the manifest had been rewritten too
    refused(bundle, "scann_docids.pkl")
    assert not marker.exists()


def test_unlisted_and_non_regular_files_are_refused(bundle):
    (bundle / "notes.txt").write_text("hi")
    refused(bundle, "notes.txt is not listed")
    (bundle / "notes.txt").unlink()
    os.mkfifo(bundle / artifacts.INDEX_DIR / "pipe")
    refused(bundle, "index/pipe is not a regular file")


@pytest.mark.parametrize("name", ["/ABS/rows.npy", "../outside/rows.npy", "index/../../x.npy",
                                  "./item_ids.npy", "index//rows.npy", artifacts.MANIFEST])
def test_listed_paths_outside_the_bundle_are_refused_without_looking(bundle, outside, name,
                                                                      monkeypatch):
    np.save(outside / "rows.npy", np.arange(3))
    name = name.replace("/ABS", str(outside))
    edit_manifest(bundle, lambda m: m["checksums"].update({name: entry(outside / "rows.npy")}))
    looked = []
    for fn in ("stat", "lstat", "open", "scandir"):
        real = getattr(os, fn)
        monkeypatch.setattr(os, fn, lambda p, *a, _real=real, **k: (looked.append(str(p)),
                                                                    _real(p, *a, **k))[1])
    message = refused(bundle, "not a relative path inside the bundle")
    assert name in message
    assert not [p for p in looked if str(outside) in p or ".." in p]
    # The answer is the same whether or not the outside file exists: it reveals nothing.
    (outside / "rows.npy").unlink()
    monkeypatch.undo()
    assert refused(bundle, "not a relative path") == message


@pytest.mark.parametrize("target", ["ABS", "../../outside/rows.npy"])
def test_index_rows_file_escaping_is_refused(bundle, outside, target):
    shutil.copy(bundle / artifacts.INDEX_DIR / "rows.npy", outside / "rows.npy")
    target = str(outside / "rows.npy") if target == "ABS" else target
    descriptor = bundle / artifacts.INDEX_DIR / "index.json"
    desc = json.loads(descriptor.read_text())
    descriptor.write_text(json.dumps({**desc, "rows_file": target}))
    reseal(bundle)
    refused(bundle, f"rows_file '{target}' is not 'rows.npy'")


@pytest.mark.parametrize("link", [artifacts.ITEM_VECTORS, "index", "index/scann",
                                  "index/scann/dataset.npy"])
def test_symlinks_anywhere_in_the_bundle_are_refused(bundle, outside, link):
    real = outside / "real"
    shutil.move(bundle / link, real)  # identical content: only the link itself is wrong
    (bundle / link).symlink_to(real, target_is_directory=real.is_dir())
    refused(bundle, f"{link} is a symlink")


def test_a_symlinked_bundle_directory_is_refused(bundle, tmp_path):
    (tmp_path / "link").symlink_to(bundle, target_is_directory=True)
    refused(tmp_path / "link", "is a symlink")


@pytest.mark.parametrize("asset", ["../../../outside/dataset.npy", "ABS", "sub/dataset.npy"])
def test_scann_asset_paths_outside_the_index_are_refused(bundle, outside, asset):
    scann_dir = bundle / artifacts.INDEX_DIR / "scann"
    shutil.copy(scann_dir / "dataset.npy", outside / "dataset.npy")
    asset = str(outside / "dataset.npy") if asset == "ABS" else asset
    assets = scann_dir / "scann_assets.pbtxt"
    assets.write_text(assets.read_text().replace('"dataset.npy"', json.dumps(asset)))
    reseal(bundle)
    message = refused(bundle, "scann_assets.pbtxt names")
    assert asset in message


def test_an_unknown_format_version_names_both_versions(bundle):
    edit_manifest(bundle, lambda m: m.update(format_version=99, recsys_version="9.9.9"))
    message = refused(bundle, "format_version 99")
    assert "9.9.9" in message and artifacts.recsys_version() in message
    assert f"reads format_version {artifacts.FORMAT_VERSION}" in message


@pytest.mark.parametrize("damage", ["truncated", "not_utf8", "not_object", "flipped", "empty"])
def test_a_damaged_manifest_is_one_clear_error(bundle, damage, capsys):
    path = bundle / artifacts.MANIFEST
    raw = path.read_bytes()
    if damage == "flipped":  # valid JSON, wrong digest
        target = bundle / artifacts.ITEM_VECTORS
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
        match = "item_vectors.npy does not match"
    else:
        path.write_bytes({"truncated": raw[:len(raw) // 2], "not_utf8": b"\xff" + raw[1:],
                          "not_object": b"[1, 2]", "empty": b""}[damage])
        match = "manifest.json"
    refused(bundle, match)
    from recsys import cli
    assert cli.main(["serve", "--artifacts", str(bundle), "--user", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err


# ---- versions: atomic publication, pointer, garbage collection ----------------------------


def test_republishing_under_load_never_shows_a_partial_or_mixed_version(tiny, tmp_path):
    _, ds, *_ = tiny
    root = tmp_path / "artifacts"
    export(tiny, root, 0, keep_versions=2)
    failures, loads, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                a = serve_artifacts.load(root)
                g = a.manifest["generation"]
                np.testing.assert_array_equal(a.item_vectors, vectors(ds, g))
                q_D = vectors(ds, g)[7]  # the index is this version's own too
                want = 1 + int(np.argmax(vectors(ds, g)[1:] @ q_D))
                assert a.searcher.search(q_D, 1)[1][0] == want
                loads.append(g)
            except Exception:  # noqa: BLE001 - every failure is the test's finding
                failures.append(traceback.format_exc())
            stop.wait(0.02)  # leave the 2 CI cores some time to export

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for generation in range(1, 21):
            export(tiny, root, generation, keep_versions=2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [] and len(loads) > 0
    artifacts.collect_garbage(root, 2)
    names = sorted(os.listdir(root / artifacts.VERSIONS))
    assert len(names) == 2 and artifacts.published(root).name == names[-1]
    assert serve_artifacts.load(root).manifest["generation"] == 20


def _publish(root, text, **kw):
    def write(staging):
        (staging / "x.txt").write_text(text)
        return {"text": text}
    return artifacts.publish(root, write, **kw)


def test_garbage_collection_keeps_the_current_and_versions_being_read(tmp_path):
    root = tmp_path / "root"
    first = _publish(root, "a", keep_versions=1)
    with artifacts.reading(first):
        second = _publish(root, "b", keep_versions=1)
        third = _publish(root, "c", keep_versions=1)
        assert first.is_dir() and not second.exists()  # read: kept; superseded: removed
    assert artifacts.collect_garbage(root, 1) == [first.name]
    assert artifacts.published(root) == third
    def fail(staging):
        (staging / "half.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        artifacts.publish(root, fail)
    assert os.listdir(root / artifacts.VERSIONS) == [third.name]  # no staging left behind
    assert artifacts.published(root) == third


def test_the_pointer_is_checked(tmp_path):
    root = tmp_path / "root"
    version = _publish(root, "a")
    (root / artifacts.CURRENT).unlink()
    with pytest.raises(ArtifactError, match="no published version"), artifacts.reading(root):
        pass
    (root / artifacts.CURRENT).symlink_to(f"../{version.parent.name}/{version.name}")
    with pytest.raises(ArtifactError, match="points to"), artifacts.reading(root):
        pass
    with pytest.raises(ArtifactError, match="not an artifacts root"):
        _publish(version, "b")  # a bundle is not a root


def test_index_rebuild_publishes_a_new_version(tiny, tmp_path):
    from recsys import pipeline
    root = tmp_path / "artifacts"
    old = export(tiny, root)
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    result = pipeline.rebuild_index(root, ["index.kind=exact"])
    assert result["index"] == "exact"
    new = artifacts.published(root)
    assert new != old and {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert result["version"] == new.name and result["recall@10_on_user_queries"] == 1.0
    assert result["index/tuned"] and result["index/tuned_recall@10"] == 1.0  # exact: nothing to tune
    artifacts.verify(old)
    loaded = serve_artifacts.load(root)
    assert loaded.searcher.kind == "exact" and loaded.manifest["config"]["index"]["kind"] == "exact"
    assert loaded.manifest["generation"] == 0
    np.testing.assert_array_equal(loaded.item_vectors, serve_artifacts.load(old).item_vectors)
