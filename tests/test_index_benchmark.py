"""benchmarks.index end to end on a small catalogue: its keys, a skipped peer, the picture."""

import importlib
import json

import pytest

from benchmarks import index as bench


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One run at 25,000 x 16 (a ScaNN tree), FAISS IVF-PQ only (--no-graphs)."""
    pytest.importorskip("faiss")
    out = tmp_path_factory.mktemp("bench")
    bench.main(["--json", str(out / "index.json"), "--png", str(out / "index.png"),
                "--num-items", "25000", "--dim", "16", "--num-queries", "200",
                "--exact-queries", "100", "--latency-queries", "20", "--num-clusters", "100",
                "--no-sharded-exact", "--no-graphs"])
    return out


def test_the_run_keeps_its_keys_and_adds_the_peers(small):
    d = json.loads((small / "index.json").read_text())
    for key in ("tuned_recall@10", "tuned_qps_per_cpu_s", "best_hand_tuned_qps_per_cpu_s",
                "exact_qps_per_cpu_s"):
        assert d[key] > 0
    ivf = d["peers"]["faiss_ivfpq_fs"]
    assert len(ivf["builds"]) == len(bench.IVF_LISTS_PER_SQRT_N) * len(bench.IVF_DIMS_PER_CODE)
    assert all(p["recall"] <= 1 and p["qps_per_cpu_s"] > 0 for p in ivf["curve"])
    if ivf["best"] is not None:  # the fastest point at the target, with its build's figures
        assert ivf["best"]["recall"] >= d["target_recall"]
        assert ivf["best_qps_per_cpu_s"] == max(p["qps_per_cpu_s"] for p in ivf["curve"]
                                                if p["recall"] >= d["target_recall"])
        assert ivf["index_bytes"] > 0 and ivf["latency"]["p50_us"] > 0
    for graph in ("faiss_hnsw", "hnswlib"):
        assert "--no-graphs" in d["peers"][graph]["skipped"]
    assert (small / "index.png").stat().st_size > 10_000


def test_a_missing_library_is_skipped_in_one_line(monkeypatch, capsys):
    real = importlib.import_module

    def without_peers(name, *args):
        if name in ("faiss", "hnswlib"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_peers)
    args = bench.argparse.Namespace(graphs=True, num_items=10)
    peers, versions = bench._peers(args, None, None, None, 10)
    assert versions == {} and set(peers) == set(bench.PEERS)
    assert all(list(r) == ["skipped"] and "not installed" in r["skipped"] for r in peers.values())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("benchmarks.index: ") for line in err)


@pytest.mark.parametrize("peer", ["faiss_hnsw", "hnswlib"])
def test_graph_peers_return_rows_of_the_catalogue(peer):
    module = pytest.importorskip("faiss" if peer == "faiss_hnsw" else "hnswlib")
    items, queries = bench.clustered_vectors(3000, 50, 8, num_clusters=20, seed=0)
    exact = bench.ExactSearcher(items, bench.np.arange(3000) > 0)
    truth = exact.search(queries, 10)[1]
    args = bench.argparse.Namespace(target_recall=0.9, latency_queries=5, min_qps=0)
    run = {"faiss_hnsw": bench._faiss_hnsw, "hnswlib": bench._hnswlib}[peer]
    out = run(module, items, queries, truth, 10, args)
    assert len(out["builds"]) == len(bench.HNSW_M)
    assert out["best"]["recall"] >= 0.9 and out["latency"]["p99_us"] > 0
    assert max(p["recall"] for p in out["curve"]) > 0.99  # rows map back to catalogue rows


def test_a_sweep_stops_after_its_first_point_below_the_floor():
    qps = {(1, "a"): 900, (2, "a"): 90, (4, "a"): 9, (1, "b"): 900, (2, "b"): 800}
    curve = bench._swept(list(qps), lambda knobs: {"knobs": knobs, "qps_per_cpu_s": qps[knobs]},
                         min_qps=100)
    assert [p["knobs"] for p in curve] == [(1, "a"), (2, "a"), (1, "b"), (2, "b")]
