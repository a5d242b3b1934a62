"""End to end on configs/tiny.py: train -> export -> index -> rank -> evaluate, then serve it."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from recsys import config as config_lib
from recsys import pipeline
from recsys.serve import Recommender, RequestError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONTRACT_KEYS = ["retrieval/hr@10", "retrieval/hr@100", "retrieval/ndcg@10", "index/recall@10",
                 "pipeline/hr@10", "pipeline/ndcg@10", "dataset", "num_items", "num_users",
                 "train/examples_per_sec", "train/final_loss", "train/steps", "wall_seconds"]


def tiny_config(**train):
    cfg = config_lib.load(ROOT / "configs" / "tiny.py")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    metrics = pipeline.run(tiny_config(), workdir)
    return workdir, metrics


@pytest.mark.e2e
def test_pipeline_writes_every_contract_key_and_complete_artifacts(tiny_run):
    workdir, metrics = tiny_run
    on_disk = json.loads((workdir / "metrics.json").read_text())
    for key in CONTRACT_KEYS:
        assert key in on_disk, key
    assert on_disk["train/steps"] == 40 and on_disk["num_users"] == 300
    assert on_disk["index/recall@10"] >= 0.95
    # Retrieval learned something: far above the 10/400 of a random order.
    assert on_disk["retrieval/hr@10"] > 0.1
    manifest = json.loads((workdir / "artifacts" / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["num_items"] == 400
    assert "query_tower.jax" in manifest["checksums"] and "ranker.jax" in manifest["checksums"]
    assert not list(workdir.glob("artifacts.tmp-*"))


@pytest.mark.e2e
def test_recommender_serves_known_and_new_users_without_seen_items(tiny_run):
    workdir, _ = tiny_run
    rec = Recommender.load(workdir / "artifacts")
    user = rec.a.users.ids[5].item()
    row = rec.a.users.lookup([user])[0]
    seen = rec.a.items.raw(rec.a.history_items[rec.a.history_offsets[row]:
                                               rec.a.history_offsets[row + 1]]).tolist()
    out = rec.recommend(user_id=str(user), k=10)
    assert len(out.items) == 10 and not set(out.items) & set(seen)
    assert out.scores == sorted(out.scores, reverse=True)
    assert {"query", "retrieval", "filtering", "scoring", "ordering", "total"} <= set(out.timings)
    assert out.titles and len(out.titles) == 10
    # A new user from a history, with an unknown id reported, and an explicit exclusion.
    hist = seen[:3] + ["no-such-item"]
    new = rec.recommend(history=hist, k=5, exclude=[out.items[0]])
    assert new.unknown_ids == ["no-such-item"] and len(new.items) == 5
    assert not set(new.items) & set(seen[:3]) and out.items[0] not in new.items
    cold = rec.recommend(user_id="nobody", k=3)
    assert cold.cold_start and cold.unknown_ids == ["nobody"] and len(cold.items) == 3
    batch = rec.recommend_batch([{"user_id": user, "k": 10}, {"history": seen[:2], "k": 4}])
    assert batch[0].items == out.items and len(batch[1].items) == 4


@pytest.mark.e2e
@pytest.mark.parametrize("kwargs, field", [
    ({"k": 0}, "k"), ({"k": "3"}, "k"), ({"user_id": 1.5}, "user_id"),
    ({"history": "12"}, "history"), ({"exclude": 5}, "exclude"), ({"history": [None]}, "history"),
])
def test_bad_requests_name_the_field_and_serving_continues(tiny_run, kwargs, field):
    rec = Recommender.load(tiny_run[0] / "artifacts", warmup=False)
    with pytest.raises(RequestError) as err:
        rec.recommend(**kwargs)
    assert err.value.field == field
    assert len(rec.recommend(history=[], k=2).items) == 2


@pytest.mark.e2e
def test_partial_or_corrupt_artifacts_are_refused(tiny_run, tmp_path):
    import shutil

    from recsys.artifacts import ArtifactError
    copy = tmp_path / "art"
    shutil.copytree(tiny_run[0] / "artifacts", copy)
    (copy / "item_vectors.npy").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="item_vectors.npy"):
        Recommender.load(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json"):
        Recommender.load(copy)


@pytest.mark.e2e
def test_resumed_training_matches_an_uninterrupted_run(tmp_path):
    cfg20 = tiny_config(num_steps=20, ranker_steps=0)
    cfg40 = tiny_config(num_steps=40, ranker_steps=0)
    pipeline.train(cfg20, tmp_path / "resumed")
    resumed = pipeline.train(cfg40, tmp_path / "resumed")
    straight = pipeline.train(cfg40, tmp_path / "straight")
    assert resumed["train/steps"] == 40
    np.testing.assert_allclose(resumed["train/final_loss"], straight["train/final_loss"], rtol=1e-6)


@pytest.mark.e2e
def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    from recsys.train.checkpoint import CheckpointError
    pipeline.train(tiny_config(num_steps=2, ranker_steps=0), tmp_path)
    cfg = tiny_config(num_steps=4, ranker_steps=0)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, embed_dim=8))
    with pytest.raises(CheckpointError, match="embed_dim|model"):
        pipeline.train(cfg, tmp_path)
