"""benchmarks.report renders docs/results.md from JSON; pipeline_seeds reuses only equal runs."""

import json
import pathlib

import pytest

from benchmarks import pipeline_seeds, provenance, report
from recsys import config as config_lib

BLOCKS = "\n\n".join(f"<!-- report:{n} -->\n<!-- /report:{n} -->"
                     for n, s in report.SECTIONS.items() if s.page == "results.md")
PAGE = f"# Results\n\nHand-written prose.\n\n{BLOCKS}\n\nMore prose.\n"


def _metrics(hr10, ndcg10):
    return {"hr@10": hr10, "hr@50": 0.5, "hr@100": 0.6, "ndcg@10": ndcg10}


def _ablation() -> dict:
    def row(name, group, hrs):
        per_seed = {str(s): _metrics(h, h / 2) for s, h in enumerate(hrs)}
        return {"name": name, "group": group, "runs": len(hrs), "per_seed": per_seed}

    base = {"popularity": {"test": _metrics(0.04, 0.02)},
            "ease": {"lambda": 50.0, "test": _metrics(0.08, 0.04)}}
    summary = lambda m: {k: {"mean": v, "std": 0.0} for k, v in m.items()}
    return {"config": "configs/x.py", "seeds": [0, 1, 2], "baselines": base, "rows": [
        {"name": "popularity", "group": "baseline", "runs": 1, "summary": summary(_metrics(0.04, 0.02))},
        {"name": "EASE", "group": "baseline", "runs": 1, "summary": summary(_metrics(0.08, 0.04))},
        row("plain", "cumulative", [0.1, 0.2, 0.3]),
        row("+ one", "final", [0.1, 0.1, 0.1]),
        row("without one", "change", [0.3, 0.5])]}


def _pipeline() -> dict:
    def seed_run(seed, retrieval, served):
        metrics = {"retrieval/ndcg@10": retrieval, "pipeline/ndcg@10": served,
                   "retrieval/hr@10": 2 * retrieval, "pipeline/hr@10": 2 * served,
                   "ranker/val_ndcg@10": 0.09, "ranker/val_retrieval_ndcg@10": 0.07,
                   "retrieval/recall@200": 0.5 + seed / 10, "seconds/train_retrieval": 90 + seed,
                   "wall_seconds": 300.0 + seed,
                   "ordering/intra_list_diversity": 0.5, "ordering/catalog_coverage": 0.2,
                   **{f"ordering/{p}/{k}": v for p in ("mmr", "explore") for k, v in
                      (("ndcg@10", served - 0.01), ("hr@10", 0.1), ("intra_list_diversity", 0.6),
                       ("catalog_coverage", 0.25))}}
        serve = {"ordering": "topk", "mmr_similarity": "vectors", "mmr_lambda": 0.5,
                 "explore_temperature": 0.3}
        return {"seed": seed, "load_average_before": [4.0, 3.0, 2.0], "config": {"serve": serve},
                "metrics": metrics}

    return {"runs": {"1": seed_run(1, 0.06, 0.09), "0": seed_run(0, 0.04, 0.06)}}


def _serving() -> dict:
    stage = {"p50_ms": 0.5, "p99_ms": 1.0}
    run = {"num_items": 9742, "index": {"kind": "scann", "mode": "brute_force"},
           "num_candidates": 200, "load_and_warmup_s": 7.5, "requests": 1000,
           "single_request": {**{s: stage for s in ("retrieval", "scoring")},
                              "total": {"p50_ms": 3.08, "p99_ms": 8.36}, "wall": stage},
           "baseline_query_tower_plus_index": {"p50_ms": 0.37}, "batch_64_requests_per_s": 233.0,
           "batch_256_requests_per_s": 456.4, "compilations_during_measurement": 0}
    return {"load_average_before": [4.8, 4, 3], "load_average_after": [5, 4, 3], "cpus": 2,
            "jax": "0.7", "runs": {"runs/pipeline/seed0/artifacts": run}}


def _sharding() -> dict:
    steps = {"sparse": {"10000": 0.5, "2000000": 0.55}, "dense": {"10000": 0.2, "2000000": 0.6}}
    return {"batch_size": 4096, "history_len": 20, "embed_dim": 32, "wall_seconds": 150.0,
            "examples_per_sec": {"1": 11000.0, "8": 6600.0}, "step_seconds": steps,
            "step_seconds_1_device": steps, "table_bytes_per_device_ratio": 0.125,
            "num_row_shards": 8, "max_abs_diff_vs_single_device": 3.8e-7,
            "max_abs_diff_vs_single_device_sparse": 1e-6}


def _scale() -> dict:
    m = {"num_items": 10000000, "index/target_recall": 0.95, "index/tuned_recall@10": 0.951,
         "index/fallback": False, "index/recall@10": 0.953, "index/qps_per_cpu_s": 3530.3,
         "index/exact_qps_per_cpu_s": 20.6, "memory/peak_rss_gib": 11.65,
         "seconds/train_retrieval": 21.2, "seconds/export": 330.0,
         "seconds/evaluate_retrieval": 27.4, "seconds/evaluate_pipeline": 84.4,
         "wall_seconds": 479.0}
    return {"runs": {"synthetic_10m": {"command": "x", "metrics": m}}}


def _http() -> dict:
    return {"requests": 10000, "failed_requests": 0, "versions_seen": {"a": 6000, "b": 4000},
            "p50_ms": 18.5, "p99_ms": 40.8, "in_process_p50_ms": 0.95, "in_process_p99_ms": 1.45,
            "requests_per_second": 412.0, "client_threads": 8, "num_items": 400,
            "publish_and_reload_s": 3.8, "server_errors_counted": 0}


def _index() -> dict:
    tree = {"mode": "tree_ah", "num_leaves": 2000, "leaves_to_search": 48, "reorder": 200}
    return {"num_items": 1000000, "dim": 64, "target_recall": 0.95, "held_out_queries": 2000,
            "derived_params": tree, "derived_recall@10": 0.99, "derived_qps_per_cpu_s": 10000.0,
            "tuned_params": {**tree, "leaves_to_search": 20, "reorder": 100},
            "tuned_recall@10": 0.951, "tuned_qps_per_cpu_s": 30000.0,
            "best_hand_tuned": {**tree, "leaves_to_search": 16, "recall": 0.952,
                                "qps_per_cpu_s": 31000.0},
            "best_hand_tuned_qps_per_cpu_s": 31000.0, "exact_qps_per_cpu_s": 300.0,
            "sharded_jax_exact_qps_per_cpu_s": 200.0, "sharded_jax_exact_devices": 1,
            "sharded_jax_exact_agrees": True, "tuned_vs_best_hand_tuned": 0.968,
            "tuned_vs_exact": 100.0, "tuned_latency": {"p50_us": 40.0, "p99_us": 90.0},
            "build_cpu_s": 30.0, "tune_cpu_s": 10.0, "index_mib": 279.0, "load_s": 0.7}


def _throughput() -> dict:
    """What benchmarks/throughput.py wrote for the committed page (its full shape)."""
    return json.loads((pathlib.Path(__file__).resolve().parents[1] / "docs" / "throughput.json"
                       ).read_text())


def _logits_blocks() -> dict:
    return {"dim": 32, "ms_per_call": {"1024": {"autodiff": 2.0, "fused/0": 1.6, "fused/128": 1.8},
                                       "8192": {"autodiff": 300.0, "fused/0": 250.0,
                                                "fused/128": 120.0}},
            "speedup_vs_autodiff": {"1024": {"fused/0": 1.25, "fused/128": 2.0 / 1.8},
                                    "8192": {"fused/0": 1.2, "fused/128": 2.5}},
            "best_block": {"1024": "fused/0", "8192": "fused/128"},
            "default_block": {"1024": 0, "8192": 128}}


def _gpu() -> dict:
    """benchmarks/gpu.py's shape: one H200, bf16 1.8x faster, meshes equal to 3e-6."""
    run = {"platform": "gpu", "device_kind": "NVIDIA H200", "devices": 1, "batch_size": 8192,
           "steps": 300, "seconds": 1.0, "mesh": {"data": 1, "model": 1}}
    losses = [5.0, 4.5, 4.2]
    return {"device": {"platform": "gpu", "device_kind": "NVIDIA H200", "device_count": 1},
            "throughput": {"float32": {**run, "compute_dtype": "float32",
                                       "examples_per_sec": 1.0e6,
                                       "device_examples_per_sec": 1.2e6, "final_loss": 4.1},
                           "bfloat16": {**run, "compute_dtype": "bfloat16",
                                        "examples_per_sec": 1.8e6,
                                        "device_examples_per_sec": 2.4e6, "final_loss": 4.11}},
            "bf16_speedup": 1.8,
            "equality": {"accelerator": {**run, "losses": losses},
                         "cpu8": {**run, "platform": "cpu", "mesh": {"data": 4, "model": 2},
                                  "losses": losses},
                         "max_loss_diff": 3e-6, "tolerance": 1e-4, "equal": True}}


def _docs(tmp_path: pathlib.Path, **files) -> pathlib.Path:
    (tmp_path / "results.md").write_text(PAGE)
    for name, data in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    return tmp_path / "results.md"


def test_tables_render_mean_and_std_over_seeds(tmp_path):
    results = _docs(tmp_path, ablation=_ablation(), pipeline=_pipeline(), serving=_serving(),
                    sharding=_sharding(), index=_index(), http=_http(), scale_runs=_scale(),
                    throughput=_throughput(), logits_blocks=_logits_blocks(), gpu=_gpu(),
                    index_10m={**_index(), "num_items": 10_000_000})
    assert report.main(["--results", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# Results\n\nHand-written prose.") and text.endswith("More prose.\n")
    # ablation: baselines plain; seeds 0.1/0.2/0.3 -> 0.2000 ± 0.0816 (ddof 0); the final bold
    assert "| 1 | popularity | 0.0400 | 0.5000 | 0.6000 | 0.0200 |" in text
    assert "| 3 | plain | 0.2000 ± 0.0816 | 0.5000 ± 0.0000 |" in text
    assert "| 4 | **+ one = configs/x.py** | **0.1000 ± 0.0000** |" in text
    assert "| | *one change to configs/x.py:* | | | | |\n| 5 | without one (2 of 3 seeds) | " \
           "0.4000 ± 0.1000 |" in text
    assert "HR@10 0.1000 ± 0.0000 (1.25x EASE's 0.0800)" in text
    assert "Above EASE on HR@10 in 3 of 3 and HR@100 in 0 of 3 seeds." in text
    # pipeline: rows in seed order, then the mean ± std row (ratios 1.50 and 1.50)
    assert ("| 0 | 0.0400 | 0.0600 | 1.50 | 0.0800 | 0.1200 | 0.0900 (0.0700) | 300 | 4.0 |"
            in text)
    assert text.index("| 0 | 0.0400") < text.index("| 1 | 0.0600")
    assert ("| **mean ± std** | 0.0500 ± 0.0100 | 0.0750 ± 0.0150 | 1.50 ± 0.00 | "
            "0.1000 ± 0.0200 | 0.1500 ± 0.0300 | 0.0900 ± 0.0000 (0.0700 ± 0.0000) | 300 ± 0 | |"
            in text)
    assert "`retrieval/recall@200` 0.5500 ± 0.0500" in text
    assert "train_retrieval 90 ± 0" in text  # 90 and 91 seconds: 90.5 ± 0.5 to no decimals
    # ordering: each policy from its ordering/* keys
    assert "| served default (topk) | 0.0750 ± 0.0150 | 0.1500 ± 0.0300 | 0.500 ± 0.000 | " \
           "0.200 ± 0.000 |" in text
    assert "| MMR, vectors similarity, lambda 0.5 | 0.0650 ± 0.0150 |" in text
    assert "| explore, temperature 0.3 |" in text
    # gpu: a row per compute dtype, the speed-up and the equality line
    assert "| bfloat16 | 8192 | 300 | 1,800,000 | 2,400,000 | 4.1100 |" in text
    assert ("1 x NVIDIA H200 (gpu); bfloat16 / float32 end to end: 1.80x. Sharding equality: 3 "
            "sgd steps on mesh data 1 x model 1 (gpu) against data 4 x model 2 (8 CPU devices): "
            "largest per-step loss difference 3.0e-06, within the tolerance 1e-04.") in text
    # serving and sharding
    assert ("| `runs/pipeline/seed0/artifacts`, 9,742 items | ScaNN brute force | 0.50 | 0.50 | "
            "**3.08 / 8.36** | 0.37 | 233 / 456 | 7.5 | 0 |") in text
    assert "| sparse (row-wise Adagrad on tables), 8 devices | 0.500 | 0.550 | 1.10 |" in text
    assert "| dense optax, 1 device | 0.200 | 0.600 | 3.00 |" in text
    # index: tuned against the best hand-tuned and exact
    assert ("| **tuned to 0.95 (the default)** | 2000 leaves, 20 searched, reorder 100 | "
            "**0.9510** | **30,000** |") in text
    assert "Tuned / best hand-tuned: **0.97x**; tuned / exact: **100x**" in text
    assert "10,000,000 items x 64, 2,000 held-out queries." in text  # the 1e7 block
    assert "| 10,000 | 0 | 2 (6,000, 4,000) | 18.50 / 40.80 | 0.95 / 1.45 | 412 |" in text
    assert ("| `configs/synthetic_10m.py` | 10,000,000 | tuned to 0.95, held-out 0.951 | 0.953 | "
            "3,530 (21) | 11.7 GiB | 21 s | 330 s | 112 s | 479 s |") in text
    # logits blocks: the fastest fused block in bold, its speedup over autodiff
    assert "| fused, whole matrix | **1.60 (1.25x)** | 250.00 (1.20x) |" in text
    assert "| fused, 128 columns | 1.80 (1.11x) | **120.00 (2.50x)** |" in text
    assert "resolves to whole at B = 1,024, 128 at B = 8,192" in text
    assert "Not yet measured" not in text
    assert report.main(["--results", str(results), "--check"]) == 0


def test_missing_json_gives_a_placeholder_naming_the_command(tmp_path):
    results = _docs(tmp_path, ablation=_ablation())
    assert report.main(["--results", str(results)]) == 0
    text = results.read_text()
    assert text.count("*Not yet measured: run `python -m benchmarks.pipeline_seeds") == 2
    assert "*Not yet measured: run `python -m benchmarks.serving " in text
    assert "*Not yet measured: run `python -m benchmarks.sharding --json docs/sharding.json`.*" \
        in text
    assert "| 3 | plain |" in text


def test_check_detects_a_stale_table_and_changes_nothing(tmp_path, capsys):
    results = _docs(tmp_path, ablation=_ablation(), pipeline=_pipeline())
    assert report.main(["--results", str(results)]) == 0
    pipeline = _pipeline()
    pipeline["runs"]["0"]["metrics"]["pipeline/ndcg@10"] = 0.0123
    (tmp_path / "pipeline.json").write_text(json.dumps(pipeline))
    before = results.read_text()
    capsys.readouterr()
    assert report.main(["--results", str(results), "--check"]) == 1
    out = capsys.readouterr()
    assert "+| 0 | 0.0400 | 0.0123 |" in out.out and "-| 0 | 0.0400 | 0.0600 |" in out.out
    assert "is stale" in out.err
    assert results.read_text() == before
    # A new JSON file where a placeholder stood is stale too.
    (tmp_path / "sharding.json").write_text(json.dumps(_sharding()))
    assert report.main(["--results", str(results), "--check"]) == 1


def test_missing_or_unknown_blocks_and_bad_json_are_named(tmp_path, capsys):
    results = tmp_path / "results.md"
    results.write_text(PAGE.replace("<!-- report:serving -->\n<!-- /report:serving -->",
                                    "<!-- report:latency -->\n<!-- /report:latency -->"))
    assert report.main(["--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "unknown latency" in err and "missing serving" in err
    results = _docs(tmp_path, sharding={"batch_size": 1})
    assert report.main(["--results", str(results)]) == 2
    assert "sharding.json: cannot render block 'sharding': KeyError" in capsys.readouterr().err


def test_the_committed_results_page_matches_its_json():
    assert report.main(["--check"]) == 0, "run: python -m benchmarks.report"


def test_source_hash_follows_python_files_only(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    first = provenance.source_sha256(tmp_path)
    (tmp_path / "notes.txt").write_text("not code")
    assert provenance.source_sha256(tmp_path) == first
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert provenance.source_sha256(tmp_path) != first


@pytest.fixture
def fake_pipeline(monkeypatch):
    """`recsys pipeline` replaced by writing what the CLI would write."""
    calls = []

    def launch(argv):
        args = argv[argv.index("pipeline") + 1:]
        workdir = pathlib.Path(args[args.index("--workdir") + 1])
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        cfg = config_lib.apply_overrides(config_lib.load(args[args.index("--config") + 1]), sets)
        (workdir / "config.json").write_text(config_lib.dumps(cfg))
        (workdir / "metrics.json").write_text(json.dumps({"pipeline/ndcg@10": 0.1 * len(calls)}))
        calls.append(sets)
        return 0

    monkeypatch.setattr(pipeline_seeds, "launch", launch)
    return calls


def test_pipeline_seeds_reuses_a_workdir_only_for_the_same_config_and_sources(
        tmp_path, fake_pipeline, monkeypatch):
    root, log = tmp_path / "runs", lambda _: None
    go = lambda *sets: pipeline_seeds.run("configs/tiny.py", "x", (0, 1), root,
                                          sets=sets, log=log)
    first = go()
    assert len(fake_pipeline) == 2 and first["runs"]["1"]["metrics"]["pipeline/ndcg@10"] == 0.1
    assert first["runs"]["0"]["command"].startswith("recsys pipeline --config configs/tiny.py "
                                                    "--set data.path=x --set train.seed=0")
    assert go()["runs"] == first["runs"] and len(fake_pipeline) == 2  # reused
    go("train.num_steps=3")  # another resolved config: both seeds again
    assert len(fake_pipeline) == 4
    monkeypatch.setattr(provenance, "source_sha256", lambda: "other sources")
    go("train.num_steps=3")
    assert len(fake_pipeline) == 6
    (root / "seed0" / "metrics.json").unlink()  # an unfinished run is redone from scratch
    marker = json.loads((root / "seed0" / pipeline_seeds.MARKER).read_text())
    (root / "seed0" / pipeline_seeds.MARKER).write_text(json.dumps(
        {k: marker[k] for k in ("config_sha256", "source_sha256")}))
    go("train.num_steps=3")
    assert len(fake_pipeline) == 7
    (root / "seed5").mkdir()
    (root / "seed5" / "model").write_text("someone else's")
    with pytest.raises(pipeline_seeds.SeedRunError, match="not made by"):
        pipeline_seeds.run("configs/tiny.py", "x", (5,), root, log=log)
