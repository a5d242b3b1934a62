"""End to end on configs/tiny.py: train -> export -> index -> rank -> evaluate (serving: test_serving);
export and eval restore, never train; two runs write the same metrics."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from recsys import artifacts, pipeline
from recsys import config as config_lib

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
    version = artifacts.published(workdir / artifacts.ROOT)
    manifest = json.loads((version / artifacts.MANIFEST).read_text())
    assert manifest["format_version"] == artifacts.FORMAT_VERSION and manifest["num_items"] == 400
    assert artifacts.QUERY_TOWER in manifest["checksums"] and artifacts.RANKER in manifest["checksums"]
    assert not list(workdir.glob(f"**/*{artifacts.STAGING_SUFFIX}"))


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


def timing(key: str) -> bool:
    return (key.startswith(("seconds/", "memory/")) or key.endswith("seconds")
            or "examples_per_sec" in key or "_ms" in key or "qps" in key)


def no_training(monkeypatch):
    """Makes every training entry point fail: what follows may only restore."""
    from recsys.train import loop, ranker

    def refuse(*args, **kwargs):
        raise AssertionError("trained")

    for module, name in [(pipeline, "train_retrieval"), (pipeline, "train_ranker"),
                         (loop, "train_retrieval"), (ranker, "train_retrieval"),
                         (ranker, "fit_ranker")]:
        monkeypatch.setattr(module, name, refuse)


def checkpoint_files(workdir: pathlib.Path) -> dict:
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns
            for p in sorted(workdir.glob("**/checkpoints/**/*")) if p.is_file()}


@pytest.mark.e2e
def test_eval_after_training_restores_and_trains_nothing(tiny_run, monkeypatch):
    workdir, ran = tiny_run
    before = checkpoint_files(workdir)
    no_training(monkeypatch)
    again = pipeline.evaluate(config_lib.load(ROOT / "configs" / "tiny.py"), workdir)
    assert checkpoint_files(workdir) == before
    for key in ("retrieval/hr@10", "retrieval/ndcg@10", "index/recall@10", "pipeline/hr@10",
                "pipeline/ndcg@10", "ordering/mmr/ndcg@10"):
        assert again[key] == ran[key], key


@pytest.mark.e2e
def test_two_runs_write_identical_metrics(tiny_run, tmp_path, monkeypatch):
    """A second run in a fresh workdir, through train, export and eval, writes the pipeline's
    metrics.json again bit for bit (timings aside)."""
    workdir, _ = tiny_run
    cfg = config_lib.load(ROOT / "configs" / "tiny.py")
    pipeline.train(cfg, tmp_path)
    no_training(monkeypatch)
    version = pipeline.export(cfg, tmp_path)
    assert version is not None and version.is_dir()
    pipeline.evaluate(cfg, tmp_path)
    first = json.loads((workdir / "metrics.json").read_text())
    second = json.loads((tmp_path / "metrics.json").read_text())
    assert ({k: v for k, v in second.items() if not timing(k)}
            == {k: v for k, v in first.items() if not timing(k)})


@pytest.mark.e2e
def test_eval_refuses_a_ranker_made_for_an_older_retrieval_model(tmp_path):
    from recsys.train.checkpoint import CheckpointError
    pipeline.train(tiny_config(num_steps=4, ranker_steps=2), tmp_path)
    pipeline.train(tiny_config(num_steps=8, ranker_steps=0), tmp_path)  # the ranker is now stale
    with pytest.raises(CheckpointError, match=r"checkpoints/ranker/\d+ is stale: .*"
                                              r"retrieval/steps=4 \(now 8\)"):
        pipeline.evaluate(tiny_config(num_steps=8, ranker_steps=2), tmp_path)
