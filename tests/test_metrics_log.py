"""recsys.metrics_log: scalars to WORKDIR/metrics.jsonl and TensorBoard files (read back with
TensorBoard's EventAccumulator); training writes loss and validation scalars; a resume appends."""

import dataclasses
import json
import math
import pathlib

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recsys import config as config_lib
from recsys import metrics_log, pipeline
from recsys.metrics_log import MetricsLog

ROOT = pathlib.Path(__file__).resolve().parents[1]


def records(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def tb_scalars(workdir: pathlib.Path, stage: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (purged events left out)."""
    acc = EventAccumulator(str(workdir / "tb" / stage))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def steps_of(recs: list[dict], stage: str, key: str) -> list[int]:
    return [r["step"] for r in recs if r["stage"] == stage and key in r]


def test_lines_and_tensorboard_scalars(tmp_path):
    with MetricsLog(tmp_path, started=0.0) as log:
        log.begin("retrieval", 1)
        log.write("retrieval", 10, {"train/loss": 2.5, "train/learning_rate": 0.01})
        log.write("retrieval", 10, {"val/hr@10": 0.25})
        log.write("ranker", 0, {"val/ndcg@10": float("nan")})
        log.flush()
        assert len(records(tmp_path)) == 3  # flushed: readable while the run goes on
    first, second, third = records(tmp_path)
    assert first["step"] == 10 and first["stage"] == "retrieval" and first["time"] > 0
    assert {k: first[k] for k in ("train/loss", "train/learning_rate")} == {
        "train/loss": 2.5, "train/learning_rate": 0.01}
    assert second["val/hr@10"] == 0.25
    assert third == {"step": 0, "stage": "ranker", "time": third["time"], "val/ndcg@10": None}
    tb = tb_scalars(tmp_path, "retrieval")
    assert tb["train/loss"] == [(10, 2.5)] and tb["val/hr_10"] == [(10, 0.25)]
    assert math.isnan(tb_scalars(tmp_path, "ranker")["val/ndcg_10"][0][1])


def test_a_restarted_stage_hides_what_it_logged_past_its_checkpoint(tmp_path):
    with MetricsLog(tmp_path) as log:
        log.begin("retrieval", 1)
        for step in (10, 20, 30):
            log.write("retrieval", step, {"train/loss": 1.0})
    with MetricsLog(tmp_path) as log:  # resumed from the checkpoint at step 20
        log.begin("retrieval", 21)
        for step in (30, 40):
            log.write("retrieval", step, {"train/loss": 2.0})
    assert steps_of(records(tmp_path), "retrieval", "train/loss") == [10, 20, 30, 30, 40]
    assert tb_scalars(tmp_path, "retrieval")["train/loss"] == [(10, 1.0), (20, 1.0), (30, 2.0),
                                                               (40, 2.0)]


def test_closed_on_errors_and_silent_on_other_processes(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError), MetricsLog(tmp_path / "a") as log:
        log.write("retrieval", 1, {"train/loss": 1.0})
        raise RuntimeError("boom")
    assert log._file is None and not log._writers
    assert records(tmp_path / "a")[0]["train/loss"] == 1.0
    assert tb_scalars(tmp_path / "a", "retrieval")["train/loss"] == [(1, 1.0)]
    monkeypatch.setattr(metrics_log.jax, "process_index", lambda: 1)
    with MetricsLog(tmp_path / "b") as log:
        log.begin("retrieval", 1)
        log.write("retrieval", 1, {"train/loss": 1.0})
    assert not (tmp_path / "b").exists()


def tiny_config(num_steps: int) -> config_lib.Config:
    cfg = config_lib.load(ROOT / "configs" / "tiny.py")
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, num_steps=num_steps, eval_every=10, log_every=5),
        ranker=dataclasses.replace(cfg.ranker, steps=4, eval_every=2, patience=0))


@pytest.mark.e2e
def test_training_logs_loss_and_validation_and_a_resume_appends(tmp_path):
    pipeline.train(tiny_config(20), tmp_path)
    metrics = pipeline.train(tiny_config(40), tmp_path)  # resumes at 20; the ranker trains again
    recs = records(tmp_path)
    for stage in ("retrieval", "shadow_retrieval"):
        assert steps_of(recs, stage, "train/loss") == [5, 10, 15, 20, 25, 30, 35, 40], stage
        assert steps_of(recs, stage, "val/hr@10") == [10, 20, 30, 40], stage
        tb = tb_scalars(tmp_path, stage)
        assert [s for s, _ in tb["train/loss"]] == [5, 10, 15, 20, 25, 30, 35, 40], stage
        assert [s for s, _ in tb["val/hr_10"]] == [10, 20, 30, 40], stage
        assert {"train/learning_rate", "train/examples_per_sec", "val/ndcg_10"} <= set(tb)
        jsonl_loss = [r["train/loss"] for r in recs if r["stage"] == stage and "train/loss" in r]
        assert [v for _, v in tb["train/loss"]] == pytest.approx(jsonl_loss, rel=1e-6)
    last = [r for r in recs if r["stage"] == "retrieval" and "train/loss" in r][-1]
    assert last["train/loss"] == pytest.approx(metrics["train/final_loss"], rel=1e-6)
    # The ranker trained twice (its retrieval model changed): both runs in the file, the last
    # one's in TensorBoard.
    assert steps_of(recs, "ranker", "val/ndcg@10") == [0, 2, 4, 0, 2, 4]
    tb = tb_scalars(tmp_path, "ranker")
    assert [s for s, _ in tb["val/ndcg_10"]] == [s for s, _ in tb["val/hr_10"]] == [0, 2, 4]
    assert tb["train/final_loss"] == [(metrics["ranker/steps"],
                                       pytest.approx(metrics["ranker/final_loss"], rel=1e-6))]
    times = [r["time"] for r in recs]
    assert all(t >= 0 for t in times)
