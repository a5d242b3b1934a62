"""End to end on configs/tiny.py: train -> export -> index -> rank -> evaluate (serving: test_serving)."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from recsys import config as config_lib
from recsys import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONTRACT_KEYS = ["retrieval/hr@10", "retrieval/hr@100", "retrieval/ndcg@10", "index/recall@10",
                 "pipeline/hr@10", "pipeline/ndcg@10", "dataset", "num_items", "num_users",
                 "train/examples_per_sec", "train/final_loss", "train/steps", "wall_seconds"]
# Per-stage metrics beside the contract: recall of retrieval, the ranker's validation, ordering.
STAGE_KEYS = ["retrieval/recall@50", "ranker/val_ndcg@10", "ranker/val_retrieval_ndcg@10",
              "ordering/intra_list_diversity", "ordering/catalog_coverage",
              *[f"ordering/{p}/{m}" for p in ("mmr", "explore")
                for m in ("ndcg@10", "hr@10", "intra_list_diversity", "catalog_coverage")],
              *[f"seconds/{stage}" for stage in ("train_retrieval", "evaluate_retrieval",
                                                 "train_ranker", "export", "evaluate_pipeline")]]


def tiny_config(ranker_steps: int | None = None, **train):
    cfg = config_lib.load(ROOT / "configs" / "tiny.py")
    ranker = cfg.ranker if ranker_steps is None else dataclasses.replace(cfg.ranker,
                                                                         steps=ranker_steps)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train), ranker=ranker)


@pytest.mark.e2e
def test_pipeline_writes_every_contract_key_and_complete_artifacts(tiny_run):
    workdir, _ = tiny_run
    on_disk = json.loads((workdir / "metrics.json").read_text())
    for key in CONTRACT_KEYS + STAGE_KEYS:
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
def test_resumed_training_matches_an_uninterrupted_run(tmp_path):
    cfg20 = tiny_config(num_steps=20, ranker_steps=0)
    cfg40 = tiny_config(num_steps=40, ranker_steps=0)
    pipeline.train(cfg20, tmp_path / "resumed")
    resumed = pipeline.train(cfg40, tmp_path / "resumed")
    straight = pipeline.train(cfg40, tmp_path / "straight")
    assert resumed["train/steps"] == 40
    np.testing.assert_allclose(resumed["train/final_loss"], straight["train/final_loss"], rtol=1e-6)


@pytest.mark.e2e
def test_resumed_retrieval_retrains_the_ranker_made_for_the_old_model(tmp_path):
    pipeline.train(tiny_config(num_steps=20), tmp_path / "resumed")
    resumed = pipeline.train(tiny_config(num_steps=40), tmp_path / "resumed")
    straight = pipeline.train(tiny_config(num_steps=40), tmp_path / "straight")
    assert resumed["train/steps"] == 40
    # The ranker saved after 20 steps read the old model's features: it is trained again.
    np.testing.assert_allclose(resumed["ranker/final_loss"], straight["ranker/final_loss"],
                               rtol=1e-5)
    again = pipeline.train(tiny_config(num_steps=40), tmp_path / "resumed")  # nothing to do
    assert again["ranker/final_loss"] == resumed["ranker/final_loss"]


@pytest.mark.e2e
def test_an_early_stopped_run_is_finished_when_run_again(tmp_path):
    cfg = tiny_config(num_steps=400, eval_every=5, early_stopping_patience=1, ranker_steps=0)
    first = pipeline.train(cfg, tmp_path)
    assert first["train/steps"] < 400, "the run should have stopped early"
    again = pipeline.train(cfg, tmp_path)
    # Nothing trained past the best state: same step count, same validated model and score.
    assert again["train/steps"] == first["train/steps"]
    assert again["train/best_val_hr@10"] == first["train/best_val_hr@10"]
    assert again["train/best_step"] == first["train/best_step"]
    pipeline.evaluate(cfg, tmp_path)  # `recsys eval` reads the same model: trains nothing
    saved = [int(d.name) for d in (tmp_path / "checkpoints" / "retrieval").iterdir()
             if d.name.isdigit()]
    assert max(saved) == first["train/steps"]


@pytest.mark.e2e
def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    from recsys.train.checkpoint import CheckpointError
    pipeline.train(tiny_config(num_steps=2, ranker_steps=0), tmp_path)
    cfg = tiny_config(num_steps=4, ranker_steps=0)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, embed_dim=8))
    with pytest.raises(CheckpointError, match="embed_dim|model"):
        pipeline.train(cfg, tmp_path)
