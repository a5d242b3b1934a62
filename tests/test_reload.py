"""`Recommender.reload`: the published version swapped in whole, each answer tagged with the
version that made it, requests never failing or mixing versions meanwhile."""

import shutil
import threading
import time
import traceback

import pytest

from recsys import artifacts
from recsys.artifacts import ArtifactError
from recsys.serve import Recommender

pytestmark = pytest.mark.e2e


def republish(root, **serve):
    """Publishes a copy of root's current version with `serve` laid over its stored serve config
    (a version that answers differently, as a new export would); returns its directory."""
    old = artifacts.published(root)
    manifest = artifacts.verify(old)
    config = manifest["config"]
    fields = {**manifest, "config": {**config, "serve": {**config.get("serve", {}), **serve}}}

    def write(staging):
        for name in manifest["checksums"]:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(old / name, staging / name)
        return fields

    return artifacts.publish(root, write)


def own_root(tiny_run, directory):
    """A private copy of the tiny run's artifacts root, in `directory`: tests publish into it."""
    root = directory / "artifacts"
    shutil.copytree(tiny_run[0] / "artifacts", root, symlinks=True)
    return root


def requests_of(rec, n=12):
    return [{"user_id": u.item(), "k": 5 + i % 6} for i, u in enumerate(rec.artifacts.users.ids[:n])]


def answers(rec, reqs):
    return [(r.items, r.scores) for r in rec.recommend_batch(reqs)]


def test_reload_swaps_in_the_published_version_and_keeps_serving(tiny_run, tmp_path):
    root = own_root(tiny_run, tmp_path)
    rec = Recommender.load(root)
    first, loaded = rec.version, rec.artifacts
    assert first == artifacts.published(root).name
    assert rec.reload() == first and rec.artifacts is loaded  # unchanged pointer: nothing built
    reqs = requests_of(rec)
    assert {r.version for r in rec.recommend_batch(reqs)} == {first}
    banned = rec.recommend_batch(reqs)[0].items[0]
    assert rec.set_available([banned, "no-such-item"], False) == ["no-such-item"]
    old = answers(rec, reqs)

    second = republish(root, exclude_seen=False)
    failures, seen, stop = [], [], threading.Event()

    def client():
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                got = rec.recommend_batch(reqs)
                seen.extend((r.version, i, (r.items, r.scores)) for i, r in enumerate(got))
            except Exception:  # noqa: BLE001 - every failure is the test's finding
                failures.append(traceback.format_exc())

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        assert rec.reload() == second.name == rec.version
        deadline = time.monotonic() + 60
        while not any(v == second.name for v, *_ in seen) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    new = answers(rec, reqs)
    assert failures == [] and new != old
    # Every answer is wholly one version's: the one its tag names; both were served.
    assert {v for v, *_ in seen} == {first, second.name}
    for version, i, got in seen:
        assert got == (old if version == first else new)[i]
    assert all(r.version == second.name for r in rec.recommend_batch(reqs))
    row = rec.artifacts.items.lookup([banned])[0]
    assert not rec.filter.availability.mask[row]  # marks carry over to the new version
    assert all(banned not in items for items, _ in new)
    rec.set_available([banned], True)
    assert rec.filter.availability.mask[row]


def test_a_broken_new_version_is_refused_and_the_old_one_serves_on(tiny_run, tmp_path):
    root = own_root(tiny_run, tmp_path)
    rec = Recommender.load(root, warmup=False)
    first = rec.version
    republish(root, ordering="bogus")
    with pytest.raises(ValueError, match=r"serve\.ordering"):
        rec.reload(warmup=False)
    corrupt = republish(root, ordering="topk")
    (corrupt / artifacts.ITEM_VECTORS).write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="item_vectors.npy"):
        rec.reload(warmup=False)
    assert rec.version == first and rec.recommend(user_id=1, k=3).version == first


def test_a_bundle_outside_an_artifacts_root_has_nothing_to_reload(tiny_run, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(artifacts.published(tiny_run[0] / "artifacts"), bundle)
    rec = Recommender.load(bundle, warmup=False)
    assert rec.version == "bundle"
    with pytest.raises(ArtifactError, match="no `current` to reload from"):
        rec.reload()
