"""benchmarks.throughput: the recsys side at tiny size, the TFRS side when a peer venv has TFRS."""

import json

import numpy as np
import pytest

from benchmarks import report, throughput


def _movielens(tmp_path, users=40, items=50, per_user=12):
    """A tiny ml-latest layout: ratings.csv and movies.csv."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ml-tiny"
    root.mkdir()
    movies = ["movieId,title,genres"] + [f"{i},Movie {i} (1999),Drama|Comedy"
                                         for i in range(1, items + 1)]
    (root / "movies.csv").write_text("\n".join(movies) + "\n")
    ratings = ["userId,movieId,rating,timestamp"]
    for u in range(1, users + 1):
        for t, i in enumerate(rng.choice(np.arange(1, items + 1), per_user, replace=False)):
            ratings.append(f"{u},{i},4.0,{1_000_000 + 100 * t}")
    (root / "ratings.csv").write_text("\n".join(ratings) + "\n")
    return root


def test_recsys_side_without_tfrs(tmp_path, capsys):
    """A peer interpreter without TFRS: one line says so, the ratio is null, recsys still runs."""
    out = tmp_path / "throughput.json"
    result = throughput.main(["--data", str(_movielens(tmp_path)), "--peer-python",
                              throughput.sys.executable, "--batch-sizes", "32", "--pairs", "1",
                              "--steps", "3", "--skip-devices", "--skip-rows", "--skip-movielens",
                              "--json", str(out)])
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "TFRS side skipped" in line]
    assert len(skipped) == 1 and "cannot import TensorFlow Recommenders" in skipped[0]
    assert result["ratio_vs_tfrs"] is None and "TensorFlow" in result["tfrs_skipped"]
    run = result["pairs"]["32"][0]["recsys"]
    assert "tfrs" not in result["pairs"]["32"][0]
    assert run["window_steps"] == 3 and run["table_update"] == "dense"
    assert run["examples_per_sec"] > 0 and run["examples_per_cpu_s"] > 0
    assert result["host_input_fraction"] is None  # --skip-movielens
    assert len(result["load_avg"]["before"]) == 3 and len(result["load_avg"]["after"]) == 3
    assert json.loads(out.read_text())["pairs"] == result["pairs"]
    assert "| 32 | – |" in report.throughput_table(result)


def test_missing_data_skips_with_a_reason(tmp_path):
    result = throughput.main(["--data", str(tmp_path / "nowhere")])
    assert "ratings.csv missing" in result["skipped"]
    assert "Not measured" in report.throughput_table(result)


def test_median_ratio_per_batch_size():
    runs = lambda *pairs: [{"tfrs": {"x": t}, "recsys": {"x": r}} for t, r in pairs]
    ratios = throughput.median_ratios({"8": runs((1, 2), (1, 3), (2, 2)), "16": runs((4, 2))},
                                      "x")
    assert ratios == {"8": 2.0, "16": 0.5}
    assert throughput.median_ratios({"8": [{"recsys": {"x": 1}}]}, "x") is None


def test_tfrs_side_tiny(tmp_path):
    """The tutorial model trains a few steps in the peer venv (skipped when TFRS is absent)."""
    peer = str(throughput.PEER_VENV_PYTHON)
    versions, why = throughput.probe_peer(peer)
    if why:
        pytest.skip(f"TFRS side: {why}")
    pairs = tmp_path / "pairs.npz"
    np.savez(pairs, user=np.arange(64) % 7 + 100, item=np.arange(64) % 11 + 5)
    run = throughput.run_tfrs(peer, pairs, batch_size=16, steps=2)
    assert run["side"] == "tfrs" and run["examples_per_sec"] > 0
    assert run["tensorflow_recommenders"] == versions["tensorflow_recommenders"]


def test_report_renders_every_part():
    run = lambda x: {"examples_per_sec": x, "examples_per_cpu_s": x / 2}
    summary = lambda by: {"step_examples_per_sec": by, "examples_per_cpu_s": by,
                          "examples_per_sec_end_to_end": by}
    d = {"data": "/d/ml-latest-small", "train_examples": 1000, "steps": {"8": 20},
         "tfrs": {"tensorflow": "2.21.0", "tensorflow_recommenders": "v0.7.7"},
         "pairs": {"8": [{"tfrs": run(100.0), "recsys": run(300.0)},
                         {"tfrs": run(100.0), "recsys": run(200.0)}]},
         "ratio_vs_tfrs": {"8": 2.5}, "ratio_per_cpu_s_vs_tfrs": {"8": 2.5},
         "ratio_window_vs_tfrs": {"8": 2.4},
         "movielens_examples_per_sec_end_to_end": 5000.0, "host_input_fraction": 0.25,
         "mining_wait_fraction": 0.125,
         "devices": {"batch_size": 8, **summary({"1": 10.0, "8": 5.0})},
         "table_rows": {"batch_size": 8, "auto_resolves_to": {"10000": "rowwise_adagrad"},
                        "step_examples_per_sec": {"dense": {"10000": 7.0}}},
         "load_avg": {"before": [1.0, 1.0, 1.0], "after": [2.0, 2.0, 2.0]}, "wall_seconds": 60}
    text = report.throughput_table(d)
    assert "| 8 | 100 / 100 | 300 / 200 | **2.50x** | 2.40x | 50 / 50 | 150 / 100 | 2.50x |" in text
    assert "25.0% of the training wall" in text and "1 / 8, batch 8: 10 / 5" in text
    assert "mining refreshes still running on their thread 12.5% (`mining_wait_fraction`)" in text
    assert "`dense` 7 (`auto` chose rowwise_adagrad at 10,000)" in text
