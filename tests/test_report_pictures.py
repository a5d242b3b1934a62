"""recsys.report draws four non-trivial PNGs of a run and skips, with a reason, what it cannot draw."""

import json
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from recsys import report
from recsys.cli import main
from recsys.index import ScannParams, ScannSearcher, ShardedSearcher, clustered_vectors


def _jsonl_rows() -> list[dict]:
    """What training writes (recsys.metrics_log), a resumed step and a cut-off line included."""
    rows = [{"step": s, "stage": "retrieval", "time": s / 10, "train/loss": 5.0 - s / 20,
             "train/examples_per_sec": 1e4} for s in range(10, 50, 10)]
    rows += [{"step": s, "stage": "retrieval", "time": 5.0, "val/hr@10": 0.1 + s / 1000,
              "val/ndcg@10": 0.05 + s / 2000, "val/hr@100": 0.4} for s in (20, 40)]
    rows += [{"step": s, "stage": "ranker", "time": 6.0, "val/ndcg@10": 0.2 + s / 1000}
             for s in (0, 10, 20)]
    rows.append({"step": 30, "stage": "retrieval", "time": 7.0, "train/loss": 3.0})  # resumed
    return rows


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the tiny pipeline's workdir (artifacts, metrics, config) with a metrics.jsonl."""
    workdir, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))
    if not (run / "metrics.jsonl").is_file():
        lines = [json.dumps(r) for r in _jsonl_rows()]
        (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5')
    return run


def _assert_picture(path):
    import matplotlib.image
    assert path.is_file() and path.stat().st_size > 10_000, path
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert width >= 500 and height >= 300, (path, pixels.shape)
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 20, (path, len(colours))  # not blank: axes, text, data in colours


def test_four_pictures_of_a_pipeline_run(run_copy, capsys):
    assert main(["report", "--workdir", str(run_copy), "--requests", "40"]) == 0
    printed = capsys.readouterr().out
    for name in report.PICTURES:
        _assert_picture(run_copy / "report" / f"{name}.png")
        assert f"{name}.png" in printed
    assert "skipped" not in printed


def test_missing_inputs_skip_their_picture_with_a_reason(run_copy, tmp_path):
    (run_copy / "metrics.jsonl").unlink()
    shutil.rmtree(run_copy / "artifacts")
    (run_copy / "config.json").unlink()  # popularity left out, HR@K still drawn
    out = tmp_path / "pictures"
    result = report.render(run_copy, out)
    assert list(result.written) == ["hr_at_k"]
    _assert_picture(out / "hr_at_k.png")
    assert "metrics.jsonl" in result.skipped["curves"]
    assert "artifacts" in result.skipped["index"] and "artifacts" in result.skipped["latency"]
    assert any("popularity" in note and "config.json" in note for note in result.notes)


def test_nothing_to_draw_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "stage": "retrieval"}\n')
    assert main(["report", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recsys report: error: nothing to draw"), err


def test_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    assert main(["report", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'recsys[report]'" in err[0], err


def test_curves_keep_the_later_line_of_a_repeated_step():
    loss = report.series(_jsonl_rows(), report.is_loss)
    assert loss[("retrieval", "train/loss")] == ([10, 20, 30, 40], [4.5, 4.0, 3.0, 3.0])
    val = report.series(_jsonl_rows(), report.is_validation_at_10)
    assert set(val) == {("retrieval", "val/hr@10"), ("retrieval", "val/ndcg@10"),
                        ("ranker", "val/ndcg@10")}


@pytest.mark.parametrize("shards", [1, 2])
def test_index_sweep_trades_recall_for_speed(shards):
    items_VxD, q_QxD = clustered_vectors(3000, 200, 16, num_clusters=50, seed=0)
    params = ScannParams(mode="tree_ah", num_leaves=40, leaves_to_search=8,
                         training_sample_size=1500, reorder=40)
    rows_V = np.arange(len(items_VxD))
    searchers = [ScannSearcher(items_VxD, params, np.isin(rows_V, part) & (rows_V > 0))
                 for part in np.array_split(rows_V, shards)]  # row 0 is padding
    searcher = searchers[0] if shards == 1 else ShardedSearcher(searchers, *items_VxD.shape)
    points = report.index_sweep(searcher, items_VxD, q_QxD)
    assert points[0]["series"].startswith("exact") and points[0]["recall"] == 1.0
    swept = points[1:]
    assert {p["series"] for p in swept} == {f"ScaNN tree-AH, reorder {r}" for r in (10, 40, 160)}
    assert sum(p["published"] for p in swept) == 1
    by_leaves = {int(p["label"]): p["recall"] for p in swept if p["series"].endswith("160")}
    assert min(by_leaves) == 1 and max(by_leaves) == 40
    assert by_leaves[40] > by_leaves[1] and by_leaves[40] > 0.9
    assert all(p["qps"] > 0 for p in points)
