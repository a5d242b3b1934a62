"""Regenerates every table of docs/results.md, docs/reliability.md and docs/data.md from the
committed JSON.

    python -m benchmarks.report            # rewrite the pages in place
    python -m benchmarks.report --check    # exit 1 and print a diff when one would change

Each generated block sits between `<!-- report:NAME -->` and `<!-- /report:NAME -->`; the prose
around the blocks is hand-written and kept as it is. A block whose JSON is not there yet becomes
one line naming the command that measures it. Figures over seeds are mean ± standard deviation
(numpy's, ddof 0, as benchmarks.ablation stores them), computed here from the per-seed records.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import pathlib
import re
import sys
from collections.abc import Callable

import numpy as np

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
RESULTS = DOCS / "results.md"
PAGES = (RESULTS, DOCS / "reliability.md", DOCS / "data.md")
DATA = "../shared/data/ml-latest-small"
METRICS = ("hr@10", "hr@50", "hr@100", "ndcg@10")
BLOCK = re.compile(r"<!-- report:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /report:(?P=name) -->",
                   re.DOTALL)


class ReportError(Exception):
    """results.md or one of its JSON files cannot be rendered; the message names which."""


# Formatting -------------------------------------------------------------------------------------

def mean_std(values, fmt: str = ".4f") -> str:
    """'mean ± std' of the values (numpy, ddof 0)."""
    v = np.asarray(list(values), dtype=float)
    return f"{float(np.mean(v)):{fmt}} ± {float(np.std(v)):{fmt}}"


def _row(cells) -> str:
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def _seeds_text(seeds) -> str:
    return ", ".join(str(s) for s in seeds)


def _provenance(d: dict) -> str:
    """One line naming how a JSON file was made (empty when it does not say)."""
    p = d.get("provenance")
    if not p:
        return ""
    git = p.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" + local changes" if git.get("dirty") else "")
    load = " / ".join(f"{x:.1f}" for x in p.get("load_average", []))
    return (f"\n\nMeasured by `{p.get('command', '?')}` at commit {commit} (recsys sources sha256 "
            f"{p.get('source_sha256', '?')[:12]}); load average {load} on {p.get('cpus', '?')} CPUs.")


# Retrieval ablation (docs/ablation.json, benchmarks.ablation) ----------------------------------

def _values(row: dict, metric: str) -> list[float]:
    return [r[metric] for r in row["per_seed"].values()]


def ablation_table(d: dict) -> str:
    """The ablation rows: baselines as single values, two-tower rows as mean ± std over seeds."""
    lines = [_row(["#", "row", *(m.upper() for m in METRICS)]),
             "|---|---|" + "---:|" * len(METRICS)]
    previous = None
    for number, row in enumerate(d["rows"], 1):
        group = row["group"]
        if group == "change" and previous != "change":
            lines.append(_row(["", f"*one change to {d['config']}:*", *[""] * len(METRICS)]))
        previous = group
        if group == "baseline":
            name, cells = row["name"], [f"{row['summary'][m]['mean']:.4f}" for m in METRICS]
        else:
            name, cells = row["name"], [mean_std(_values(row, m)) for m in METRICS]
            if row["runs"] < len(d["seeds"]):
                name += f" ({row['runs']} of {len(d['seeds'])} seeds)"
        if group == "final":
            name, cells = f"**{name} = {d['config']}**", [f"**{c}**" for c in cells]
        lines.append(_row([number, name, *cells]))
    return "\n".join(lines)


def ablation_against_ease(d: dict) -> str:
    """The final config's figures over seeds against EASE, and how many seeds beat it."""
    final = next(r for r in d["rows"] if r["group"] == "final")
    ease = d["baselines"]["ease"]["test"]
    seeds = list(final["per_seed"])
    parts, per_seed, above = [], [], []
    for m in ("hr@10", "hr@100", "ndcg@10"):
        v = _values(final, m)
        parts.append(f"{m.upper()} {mean_std(v)} ({np.mean(v) / ease[m]:.2f}x EASE's {ease[m]:.4f})")
    for m in ("hr@10", "hr@100"):
        v = _values(final, m)
        per_seed.append(f"{m.upper()} " + " / ".join(f"{x:.4f}" for x in v))
        above.append(f"{m.upper()} in {sum(x > ease[m] for x in v)} of {len(v)}")
    return (f"`{d['config']}`, seeds {' / '.join(seeds)} (mean ± std): " + ", ".join(parts)
            + f". Per seed: {'; '.join(per_seed)}. Above EASE on " + " and ".join(above)
            + " seeds." + _provenance(d))


# Four-stage pipeline per seed (docs/pipeline.json, benchmarks.pipeline_seeds) ------------------

def _runs(d: dict) -> list[dict]:
    return [d["runs"][s] for s in sorted(d["runs"], key=int)]


def pipeline_table(d: dict) -> str:
    """Retrieval against the served pipeline per seed, then mean ± std; stage seconds below."""
    runs = _runs(d)
    ms = [r["metrics"] for r in runs]
    ratio = [m["pipeline/ndcg@10"] / m["retrieval/ndcg@10"] for m in ms]
    lines = [_row(["seed", "retrieval NDCG@10", "pipeline NDCG@10", "ratio", "retrieval HR@10",
                   "pipeline HR@10", "ranker CV NDCG@10 (retrieval order)", "wall s",
                   "load avg"]),
             "|---|" + "---:|" * 8]
    for r, m, q in zip(runs, ms, ratio):
        lines.append(_row([r["seed"], f"{m['retrieval/ndcg@10']:.4f}",
                           f"{m['pipeline/ndcg@10']:.4f}", f"{q:.2f}",
                           f"{m['retrieval/hr@10']:.4f}", f"{m['pipeline/hr@10']:.4f}",
                           _ranker_cv([m]), f"{m['wall_seconds']:.0f}",
                           f"{r['load_average_before'][0]:.1f}"]))
    col = lambda key: [m[key] for m in ms]
    lines.append(_row(["**mean ± std**", mean_std(col("retrieval/ndcg@10")),
                       mean_std(col("pipeline/ndcg@10")), mean_std(ratio, ".2f"),
                       mean_std(col("retrieval/hr@10")), mean_std(col("pipeline/hr@10")),
                       _ranker_cv(ms), mean_std(col("wall_seconds"), ".0f"), ""]))
    recall = sorted(k for k in ms[0] if k.startswith("retrieval/recall@"))
    stages = [k for k in ms[0] if k.startswith("seconds/")]
    notes = [f"`{k}` {mean_std(col(k))}" for k in recall]
    notes.append("seconds per stage " + ", ".join(
        f"{k.removeprefix('seconds/')} {mean_std(col(k), '.0f')}" for k in stages))
    return ("\n".join(lines) + f"\n\nOver seeds {_seeds_text(r['seed'] for r in runs)} "
            "(mean ± std): " + "; ".join(notes) + "." + _provenance(d))


def _ranker_cv(ms: list[dict]) -> str:
    if any("ranker/val_ndcg@10" not in m for m in ms):
        return "–"
    cv = [m["ranker/val_ndcg@10"] for m in ms]
    base = [m["ranker/val_retrieval_ndcg@10"] for m in ms]
    if len(ms) == 1:
        return f"{cv[0]:.4f} ({base[0]:.4f})"
    return f"{mean_std(cv)} ({mean_std(base)})"


def ordering_table(d: dict) -> str:
    """The served default against MMR and exploration: accuracy, diversity, coverage."""
    runs = _runs(d)
    serve = runs[0]["config"]["serve"]
    policies = [(f"served default ({serve['ordering']})", "pipeline/", "ordering/"),
                (f"MMR, {serve['mmr_similarity']} similarity, lambda {serve['mmr_lambda']:g}",
                 "ordering/mmr/", "ordering/mmr/"),
                (f"explore, temperature {serve['explore_temperature']:g}",
                 "ordering/explore/", "ordering/explore/")]
    lines = [_row(["policy", "NDCG@10", "HR@10", "ILD", "coverage"]), "|---|---:|---:|---:|---:|"]
    for name, accuracy, diversity in policies:
        col = lambda key: [r["metrics"][key] for r in runs]
        lines.append(_row([name, mean_std(col(f"{accuracy}ndcg@10")),
                           mean_std(col(f"{accuracy}hr@10")),
                           mean_std(col(f"{diversity}intra_list_diversity"), ".3f"),
                           mean_std(col(f"{diversity}catalog_coverage"), ".3f")]))
    return ("\n".join(lines) + f"\n\nMean ± std over seeds "
            f"{_seeds_text(r['seed'] for r in runs)}, test users, k = 10.")


# Serving latency (docs/serving.json, benchmarks.serving) ---------------------------------------

def _index_name(index: dict | None) -> str:
    if not index:
        return "–"
    tuned = index.get("tuning")
    recall = (f"; recall@{tuned['k']} {tuned['recall']:.3f} on {tuned['queries']:,} held-out "
              f"validation queries{', fallback' if tuned['fallback'] else ''}" if tuned else "")
    if index.get("mode") == "tree_ah":
        return (f"ScaNN tree-AH ({index['num_leaves']} leaves, {index['leaves_to_search']} "
                f"searched, reorder {index['reorder']}{recall})")
    if index.get("mode") == "brute_force":
        return f"ScaNN brute force{f' ({recall[2:]})' if recall else ''}"
    return str(index.get("kind", "–"))


def _request_recall(r: dict) -> str:
    recall = r.get("index_recall@10_on_requests")
    return "–" if recall is None else f"{recall:.3f} ({r['recall_queries']:,} users)"


def serving_table(d: dict) -> str:
    """p50 milliseconds per stage, total p50 / p99, the index's recall on the measured requests,
    the baseline and batched throughput; catalogues of `at_scale` (1e7 items) last."""
    runs = {**d["runs"], **d.get("at_scale", {})}
    stages = [s for s in next(iter(runs.values()))["single_request"] if s not in ("total", "wall")]
    lines = [_row(["catalogue", "index", *stages, "**total p50 / p99**",
                   "query tower + index alone p50", "batched req/s (64 / 256)",
                   "load + warm-up s", "compilations", "index recall@10 on these requests"]),
             "|---|---|" + "---:|" * (len(stages) + 6)]
    for name, r in runs.items():
        single = r["single_request"]
        ranker = "" if r.get("has_ranker", True) else " (no ranker)"
        lines.append(_row([f"`{name}`, {r['num_items']:,} items{ranker}",
                           _index_name(r.get("index")),
                           *(f"{single[s]['p50_ms']:.2f}" for s in stages),
                           f"**{single['total']['p50_ms']:.2f} / {single['total']['p99_ms']:.2f}**",
                           f"{r['baseline_query_tower_plus_index']['p50_ms']:.2f}",
                           (f"{r['batch_64_requests_per_s']:.0f} / "
                            f"{r['batch_256_requests_per_s']:.0f}"),
                           f"{r['load_and_warmup_s']:.1f}",
                           r["compilations_during_measurement"], _request_recall(r)]))
    first = next(iter(runs.values()))
    load = lambda key: " / ".join(f"{x:.1f}" for x in d[key])
    return ("\n".join(lines) + f"\n\nPer catalogue {first['requests']} single requests after "
            f"warm-up (random known users, k = 10, {first['num_candidates']} candidates), wall "
            f"milliseconds per stage; one run, so p50 / p99 over requests are the spread. The "
            f"recall is the index's against exact search on those users' query vectors. "
            f"Catalogues marked (no ranker) order by the retrieval score. JAX "
            f"{d['jax']}, {d['cpus']} CPUs, load average {load('load_average_before')} before and "
            f"{load('load_average_after')} after." + _provenance(d))


# Sharded training (docs/sharding.json, benchmarks.sharding) ------------------------------------

def sharding_table(d: dict) -> str:
    """Step seconds against item-table rows, sparse and dense, 8 and 1 devices; then the rest."""
    rows = list(d["step_seconds"]["sparse"])
    lines = [_row(["step time (median s)", *(f"{int(n):,} item rows" for n in rows), "ratio"]),
             "|---|" + "---:|" * (len(rows) + 1)]
    for suffix, devices in (("", "8 devices"), ("_1_device", "1 device")):
        for kind, label in (("sparse", "sparse (row-wise Adagrad on tables)"),
                            ("dense", "dense optax")):
            s = d[f"step_seconds{suffix}"][kind]
            lines.append(_row([f"{label}, {devices}", *(f"{s[n]:.3f}" for n in rows),
                               f"{s[rows[-1]] / s[rows[0]]:.2f}"]))
    eps = d["examples_per_sec"]
    throughput = " / ".join(f"{v:,.0f}" for v in eps.values())
    notes = [(f"Examples/s at batch {d['batch_size']:,}: {throughput} on {' / '.join(eps)} fake "
              "devices (they share the host's cores: the overhead of the sharded program, not "
              "scaling)."),
             (f"`table_bytes_per_device_ratio` {d['table_bytes_per_device_ratio']:.3f} with "
              f"`num_row_shards` {d['num_row_shards']}."),
             (f"`max_abs_diff_vs_single_device` {d['max_abs_diff_vs_single_device']:.1e} "
              f"(dense), {d['max_abs_diff_vs_single_device_sparse']:.1e} (row-wise Adagrad): "
              "parameters after 3 adagrad steps on 8 devices against 1."),
             (f"One run: batch {d['batch_size']}, embedding dim {d['embed_dim']}, "
              f"{d['history_len']} history items; {d['wall_seconds']:.0f} s in all.")]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + _provenance(d)


# Training throughput against TFRS (docs/throughput.json, benchmarks.throughput) ----------------

def _per_pair(runs: list[dict], side: str, key: str) -> str:
    values = [p[side][key] for p in runs if side in p and p[side].get(key) is not None]
    return " / ".join(f"{v:,.0f}" for v in values) if values else "–"


def throughput_table(d: dict) -> str:
    """recsys against TFRS per batch size (every pair's runs, the median ratio), then the rest."""
    if d.get("skipped"):
        return f"*Not measured: {d['skipped']}.*" + _provenance(d)
    ratio, cpu_ratio = d.get("ratio_vs_tfrs") or {}, d.get("ratio_per_cpu_s_vs_tfrs") or {}
    window = d.get("ratio_window_vs_tfrs") or {}
    lines = [_row(["batch", "TFRS ex/s", "recsys ex/s", "**recsys / TFRS** (median)",
                   "steady steps only (median)", "TFRS ex/CPU-s", "recsys ex/CPU-s",
                   "per CPU-s (median)"]),
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b, runs in d["pairs"].items():
        lines.append(_row([f"{int(b):,}", _per_pair(runs, "tfrs", "examples_per_sec"),
                           _per_pair(runs, "recsys", "examples_per_sec"),
                           f"**{ratio[b]:.2f}x**" if b in ratio else "–",
                           f"{window[b]:.2f}x" if b in window else "–",
                           _per_pair(runs, "tfrs", "examples_per_cpu_s"),
                           _per_pair(runs, "recsys", "examples_per_cpu_s"),
                           f"{cpu_ratio[b]:.2f}x" if b in cpu_ratio else "–"]))
    tf = d.get("tfrs") or {}
    notes = [(f"TensorFlow {tf.get('tensorflow')}, TFRS {tf.get('tensorflow_recommenders')}; "
              if tf else f"TFRS side skipped: {d.get('tfrs_skipped')}; ")
             + f"{d['train_examples']:,} training events of `{pathlib.Path(d['data']).name}`; "
             f"timed steps per run {', '.join(f'{s} at {int(b):,}' for b, s in d['steps'].items())}"
             "; runs alternate TFRS, recsys in subprocesses of their own."]
    if d.get("movielens_examples_per_sec_end_to_end") is not None:
        notes.append(f"`configs/movielens.py`, its own training end to end: "
                     f"{d['movielens_examples_per_sec_end_to_end']:,.0f} examples/s; at batch "
                     f"1,024 host input is {d['host_input_fraction']:.1%} of the training wall "
                     "time (`host_input_fraction`)"
                     + (f", and waiting for mining refreshes still running on their thread "
                        f"{d['mining_wait_fraction']:.1%} (`mining_wait_fraction`)"
                        if d.get("mining_wait_fraction") is not None else "") + ".")
    if d.get("devices"):
        dev = d["devices"]
        steps = dev["step_examples_per_sec"]
        notes.append(f"Fake CPU devices {' / '.join(steps)}, batch {dev['batch_size']:,}: "
                     + " / ".join(f"{v:,.0f}" for v in steps.values())
                     + " examples/s over the timed steps (they share the host's cores).")
    if d.get("table_rows"):
        rows = d["table_rows"]
        sizes = list(rows["auto_resolves_to"])
        cells = [f"`{opt}` " + " / ".join(f"{by[n]:,.0f}" for n in sizes)
                 for opt, by in rows["step_examples_per_sec"].items()]
        auto = ", ".join(f"{r} at {int(n):,}" for n, r in rows["auto_resolves_to"].items())
        notes.append(f"Item-table rows {' / '.join(f'{int(n):,}' for n in sizes)} (synthetic, "
                     f"batch {rows['batch_size']:,}), examples/s over the timed steps by "
                     "`train.embedding_optimizer`: "
                     + "; ".join(cells) + f" (`auto` chose {auto}).")
    load = lambda key: " / ".join(f"{x:.1f}" for x in d["load_avg"][key])
    notes.append(f"Load average {load('before')} before and {load('after')} after; "
                 f"{d['wall_seconds'] / 60:.0f} minutes in all.")
    return ("\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + _provenance(d))


def logits_blocks_table(d: dict) -> str:
    """The fused in-batch softmax per column block against autodiff, per batch size."""
    batches = list(d["ms_per_call"])
    variants = list(dict.fromkeys(v for b in batches for v in d["ms_per_call"][b]))
    lines = [_row(["forward + backward, ms (speedup)", *(f"B = {int(b):,}" for b in batches)]),
             "|---|" + "---:|" * len(batches)]
    for v in variants:
        label = ("autodiff of log_softmax, whole [B, B]" if v == "autodiff" else
                 f"fused, {'whole matrix' if v == 'fused/0' else v.split('/')[1] + ' columns'}")
        cells = []
        for b in batches:
            ms = d["ms_per_call"][b].get(v)
            if ms is None:
                cells.append("–")
                continue
            speed = d["speedup_vs_autodiff"][b].get(v)
            best = d["best_block"][b] == v
            cell = f"{ms:.2f}" + (f" ({speed:.2f}x)" if speed else "")
            cells.append(f"**{cell}**" if best else cell)
        lines.append(_row([label, *cells]))
    default = ", ".join(f"{d['default_block'][b] or 'whole'} at B = {int(b):,}" for b in batches)
    notes = [(f"Value and gradient w.r.t. q and c [B, {d['dim']}] of the in-batch softmax, "
              "jitted, median of the timings; bold: the fastest fused block. "
              f"`train.logits_chunk=0` resolves to {default}.")]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + _provenance(d)


# The blocks and the command line ----------------------------------------------------------------

def _scann_setting(p: dict) -> str:
    if p.get("mode") != "tree_ah" and "num_leaves" not in p:
        return "exact"
    return f"{p['num_leaves']} leaves, {p['leaves_to_search']} searched, reorder {p['reorder']}"


def index_table(d: dict) -> str:
    """The tuned index against the best hand-tuned ScaNN setting, exact search and the peers."""
    best = d["best_hand_tuned"] or {}
    tuned = d["tuned_params"]
    setting = _scann_setting
    rows = [
        ("derived from N (before tuning)", setting(d["derived_params"]),
         f"{d['derived_recall@10']:.4f}", f"{d['derived_qps_per_cpu_s']:,.0f}"),
        (f"**tuned to {d['target_recall']} (the default)**", setting(tuned),
         f"**{d['tuned_recall@10']:.4f}**", f"**{d['tuned_qps_per_cpu_s']:,.0f}**"),
        ("best hand-tuned (grid, same held-out queries)", setting(best) if best else "none met it",
         f"{best.get('recall', float('nan')):.4f}", f"{d['best_hand_tuned_qps_per_cpu_s']:,.0f}"),
        ("exact, numpy (ScaNN-free)", "", "1", f"{d['exact_qps_per_cpu_s']:,.0f}"),
    ]
    if "sharded_jax_exact_qps_per_cpu_s" in d:
        rows.append((f"exact, sharded JAX top-k ({d['sharded_jax_exact_devices']} device(s))", "",
                     "1" if d["sharded_jax_exact_agrees"] else "disagrees!",
                     f"{d['sharded_jax_exact_qps_per_cpu_s']:,.0f}"))
    lines = [_row(["index", "setting", "recall@10", "queries / CPU-s"]), "|---|---|---:|---:|"]
    lines += [_row(r) for r in rows]
    lat = d["tuned_latency"]
    note = (f"\n\n{d['num_items']:,} items x {d['dim']}, {d['held_out_queries']:,} held-out "
            f"queries. Tuned / best hand-tuned: **{d['tuned_vs_best_hand_tuned']:.2f}x**; tuned / "
            f"exact: **{d['tuned_vs_exact']:.0f}x**. Tuned single-query latency p50 "
            f"{lat['p50_us']:.0f} us, p99 {lat['p99_us']:.0f} us; build {d['build_cpu_s']:.0f} "
            f"CPU-s, tuning {d['tune_cpu_s']:.0f} CPU-s, {d['index_mib']:.0f} MiB on disk, loads "
            f"in {d['load_s']:.2f} s.")
    peers = index_peers_table(d) if "peers" in d else ""
    return "\n".join(lines) + note + peers + _provenance(d)


PEER_NAMES = {"faiss_ivfpq_fs": "FAISS IVF-PQ fast scan + refine", "faiss_hnsw": "FAISS HNSW",
              "hnswlib": "hnswlib HNSW"}


def _peer_setting(p: dict) -> str:
    knobs = ", ".join(f"{k} {v}" for k, v in p.items()
                      if k not in ("spec", "recall", "qps_per_cpu_s"))
    return f"{p['spec']}; {knobs}"


def index_peers_table(d: dict) -> str:
    """ScaNN beside FAISS and hnswlib: each one's fastest grid point at the target recall."""
    target = d["target_recall"]
    intro = (f"Each library's fastest setting of a small grid reaching recall@10 >= {target}, "
             "picked on the held-out queries (builds on every core, searches on one thread):")
    lines = ["\n", intro + "\n",
             _row(["library", "setting", "recall@10", "queries / CPU-s", "build s (CPU-s)",
                   "index MiB", "p50 / p99 us"]), "|---|---|---:|---:|---:|---:|---:|"]
    lat = d["tuned_latency"]
    lines.append(_row([
        "**ScaNN, tuned (the default)**", _scann_setting(d["tuned_params"]),
        f"{d['tuned_recall@10']:.4f}", f"**{d['tuned_qps_per_cpu_s']:,.0f}**",
        f"{d['build_s']:.0f} ({d['build_cpu_s']:.0f}) + tuning ({d['tune_cpu_s']:.0f})",
        f"{d['index_bytes'] / 2**20:,.0f}", f"{lat['p50_us']:.0f} / {lat['p99_us']:.0f}"]))
    for name, r in d["peers"].items():
        label = PEER_NAMES.get(name, name)
        if "skipped" in r:
            lines.append(_row([label, f"skipped: {r['skipped']}", "", "", "", "", ""]))
        elif r["best"] is None:
            top = max(r["curve"], key=lambda p: p["recall"])
            lines.append(_row([label, f"none reached {target} (best {_peer_setting(top)})",
                               f"{top['recall']:.4f}", f"{top['qps_per_cpu_s']:,.0f}", "", "", ""]))
        else:
            b, lat = r["best"], r["latency"]
            lines.append(_row([label, _peer_setting(b), f"{b['recall']:.4f}",
                               f"{b['qps_per_cpu_s']:,.0f}",
                               f"{r['build_s']:.0f} ({r['build_cpu_s']:.0f})",
                               f"{r['index_bytes'] / 2**20:,.0f}",
                               f"{lat['p50_us']:.0f} / {lat['p99_us']:.0f}"]))
    return "\n".join(lines)


def scale_table(d: dict) -> str:
    """The end-to-end runs at 1e6 and 1e7 items: index, memory and seconds per stage."""
    lines = [_row(["config", "items", "index (tuned)", "index recall@10 (test queries)",
                   "queries / CPU-s (exact)", "peak RSS", "train", "export + index", "evaluate",
                   "wall"]), "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in d["runs"].items():
        m = run["metrics"]
        lines.append(_row([
            f"`configs/{name}.py`", f"{m['num_items']:,}",
            f"tuned to {m['index/target_recall']}, held-out {m['index/tuned_recall@10']:.3f}"
            + (", fallback" if m["index/fallback"] else ""),
            f"{m['index/recall@10']:.3f}",
            f"{m['index/qps_per_cpu_s']:,.0f} ({m['index/exact_qps_per_cpu_s']:,.0f})",
            f"{m['memory/peak_rss_gib']:.1f} GiB", f"{m['seconds/train_retrieval']:.0f} s",
            f"{m['seconds/export']:.0f} s",
            f"{m['seconds/evaluate_retrieval'] + m['seconds/evaluate_pipeline']:.0f} s",
            f"{m['wall_seconds']:.0f} s"]))
    return "\n".join(lines) + _provenance(d)


def http_table(d: dict) -> str:
    """The HTTP load run with a reload in the middle, beside the in-process call."""
    versions = ", ".join(f"{n:,}" for n in d["versions_seen"].values())
    lines = [_row(["requests", "failed", "versions seen (responses each)", "HTTP p50 / p99 ms",
                   "in-process p50 / p99 ms", "requests/s"]), "|---:|---:|---|---:|---:|---:|",
             _row([f"{d['requests']:,}", d["failed_requests"],
                   f"{len(d['versions_seen'])} ({versions})",
                   f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f}",
                   f"{d['in_process_p50_ms']:.2f} / {d['in_process_p99_ms']:.2f}",
                   f"{d['requests_per_second']:.0f}"])]
    note = (f"\n\n{d['client_threads']} client threads over loopback, {d['num_items']:,} items; "
            f"the new version was published and loaded in {d['publish_and_reload_s']:.1f} s while "
            f"the old one kept answering; {d['server_errors_counted']} server errors counted. The "
            "HTTP latency is mostly queueing: 8 clients share the server's 2 cores.")
    return "\n".join(lines) + note + _provenance(d)


def faults_table(d: dict) -> str:
    """The fault campaign of benchmarks.faults: one row per kind of fault."""
    rows = [
        ("kill -9 at random moments, then resume",
         f"{d['kill_trials']} runs ({d['kills_during_save']} killed while saving)",
         f"{d['kill_resumes']} resumed, {d['kill_resumes_exact']} bit-exact"),
        (("truncate / flip / delete each file of a checkpoint step (retrieval, ranker) and of "
         "an artifacts version"), f"{d['corruption_cases']} cases",
         (f"{d['corruption_refused']} refused with one line, {d['silently_accepted']} accepted, "
         f"{d['tracebacks']} tracebacks")),
        ("malicious bundles (pickle, symlink, escaping paths, unlisted file)",
         f"{d['malicious_bundles']} bundles",
         (f"{d['malicious_refused']} refused, {d['code_executions']} code executions, "
         f"{d['outside_reads']} reads outside the bundle")),
        ("fuzzed requests (`recommend`, `recommend_batch`)", f"{d['fuzzed_requests']:,}",
         (f"{d['other_exceptions']} exceptions other than RequestError; a fixed request answers "
         f"the same after: {'yes' if d['good_request_unchanged'] else 'no'}")),
        ("re-exports while 3 threads load the current version",
         f"{d['publish_exports']} exports, {d['publish_loads']:,} loads",
         f"{d['publish_failed_loads']} failed loads"),
    ]
    lines = [_row(["fault", "trials", "outcome"]), "|---|---|---|"]
    lines += [_row(r) for r in rows]
    note = (f"\n\nThe detectors were checked in the same run (a read of the outside file and an "
            f"unpickled payload are both seen): {'yes' if d['detectors_work'] else 'NO'}. "
            f"{d['seconds'] / 60:.0f} minutes; load average {d['load_avg']:.1f} at the start.")
    return "\n".join(lines) + note + _provenance(d)


# Accelerator check (docs/gpu.json, benchmarks.gpu) ---------------------------------------------

def gpu_table(d: dict) -> str:
    """Throughput per compute dtype, then the sharding equality line."""
    dev = d["device"]
    lines = [_row(["compute_dtype", "batch", "steps", "examples/s end to end",
                   "examples/s on the device", "final loss"]), "|---|---:|---:|---:|---:|---:|"]
    for dtype, r in d["throughput"].items():
        if "error" in r:
            lines.append(_row([dtype, "", "", f"failed: {r['error'][:120]}", "", ""]))
            continue
        on_device = r.get("device_examples_per_sec")
        lines.append(_row([dtype, r["batch_size"], r["steps"], f"{r['examples_per_sec']:,.0f}",
                           f"{on_device:,.0f}" if on_device else "", f"{r['final_loss']:.4f}"]))
    e = d["equality"]
    speedup = f"{d['bf16_speedup']:.2f}x" if d.get("bf16_speedup") else "not measured"
    if e["max_loss_diff"] is None:
        equal = "failed to run: " + next(r["error"][:200] for r in (e["accelerator"], e["cpu8"])
                                         if "error" in r)
    else:
        a, c = e["accelerator"], e["cpu8"]
        mesh = lambda r: " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
        equal = (f"{len(a['losses'])} sgd steps on mesh {mesh(a)} ({a['platform']}) against "
                 f"{mesh(c)} (8 CPU devices): largest per-step loss difference "
                 f"{e['max_loss_diff']:.1e}, {'within' if e['equal'] else 'OVER'} the tolerance "
                 f"{e['tolerance']:.0e}")
    where = (f"{dev['device_count']} x {dev['device_kind']} ({dev['platform']})" if dev
             else "No run reached a device")
    return ("\n".join(lines) + f"\n\n{where}; bfloat16 / float32 end to end: {speedup}. "
            f"Sharding equality: {equal}." + _provenance(d))


# Input memory (docs/input_memory.json, benchmarks.input_memory) --------------------------------

def _mib(x: float) -> str:
    return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:,.0f} MiB"


def input_memory_table(d: dict) -> str:
    """Per size: prepare, disk, the Grain reader's peak RSS, read speed, the in-memory path and
    training from either; the settings and the order's cost below."""
    lines = [_row(["events", "examples", "prepare", "on disk (shards)",
                   "reader peak RSS (most shards open)", "read, cached / cold",
                   "in-memory path peak RSS",
                   "training from prepared / from the events: peak RSS, examples/s"]),
             "|---|" + "---|" * 7]
    for z in d["sizes"]:
        lines.append(_row([
            f"{z['events'] / 1e6:.2f}M", f"{z['examples'] / 1e6:.2f}M",
            (f"{z['prepare_seconds']:.0f} s ({z['events'] / z['prepare_seconds'] / 1e3:.0f}k "
            f"events/s), {_mib(z['prepare_peak_rss_mib'])}"),
            f"{_mib(z['disk_mib'])} ({z['shards']})",
            f"{_mib(z['peak_rss_mib'])} ({z['open_shards_max']})",
            (f"{z['read_examples_per_sec'] / 1e3:.0f}k / "
            f"{z['read_examples_per_sec_cold'] / 1e3:.0f}k examples/s"),
            _mib(z["in_memory_peak_rss_mib"]),
            (f"{_mib(z['train_peak_rss_mib'])} / {_mib(z['train_in_memory_peak_rss_mib'])}; "
            f"{z['train_examples_per_sec'] / 1e3:.0f}k / "
            f"{z['train_in_memory_examples_per_sec'] / 1e3:.0f}k")]))
    cost = lambda key: ", ".join(f"{us:.0f} µs for {b}" for b, us in d[key].items())
    note = (f"\n\n`data.shuffle_window={d['window']}`, batch {d['batch']}, prefetch "
            f"{d['prefetch']}, {d['steps']} batches read per size; a process that only imports "
            f"the reader peaks at {_mib(d['baseline_rss_mib'])}. Over 10M examples at the "
            f"default window: `BatchOrder.at` {cost('batch_order_at_us')}, `example_indices` "
            f"{cost('example_indices_us')} (Grain's `index_shuffle`: "
            f"{d['grain_index_shuffle_us']:.1f} µs per index).")
    return "\n".join(lines) + note + _provenance(d)


def shuffle_table(d: dict) -> str:
    """Retrieval and pipeline quality per seed, then mean ± std (one pipeline_seeds file)."""
    runs = _runs(d)
    ms = [r["metrics"] for r in runs]
    keys = ["retrieval/hr@10", "retrieval/hr@100", "retrieval/ndcg@10", "pipeline/hr@10",
            "pipeline/ndcg@10"]
    lines = [_row(["seed", *keys]), "|---|" + "---:|" * len(keys)]
    lines += [_row([r["seed"], *(f"{m[k]:.4f}" for k in keys)]) for r, m in zip(runs, ms)]
    lines.append(_row(["**mean ± std**", *(mean_std(m[k] for m in ms) for k in keys)]))
    sets = " ".join(f"`--set {s}`" for s in d.get("sets", [])) or "no `--set`"
    return "\n".join(lines) + f"\n\n`{d['config']}`, {sets}." + _provenance(d)


@dataclasses.dataclass(frozen=True)
class Section:
    source: str  # JSON file beside the page
    command: str  # what writes it
    render: Callable[[dict], str]
    page: str = "results.md"  # the page under docs/ that holds the block


PIPELINE = (f"python -m benchmarks.pipeline_seeds --config configs/movielens.py --data {DATA} "
            "--seeds 0,1,2 --json docs/pipeline.json")
SHUFFLE = (f"python -m benchmarks.pipeline_seeds --config configs/movielens.py --data {DATA} "
           "--seeds 0,1,2,3,4,5")
SECTIONS = {
    "ablation": Section("ablation.json", f"python -m benchmarks.ablation --data {DATA} "
                        "--seeds 0,1,2 --json docs/ablation.json", ablation_table),
    "ablation-vs-ease": Section("ablation.json", f"python -m benchmarks.ablation --data {DATA} "
                                "--seeds 0,1,2 --json docs/ablation.json", ablation_against_ease),
    "pipeline": Section("pipeline.json", PIPELINE, pipeline_table),
    "ordering": Section("pipeline.json", PIPELINE, ordering_table),
    "serving": Section("serving.json", "python -m benchmarks.serving --artifacts "
                       "runs/pipeline/seed0/artifacts --synthetic-items 1000000 "
                       "--scale-artifacts runs/synthetic_10m/artifacts --requests 1000 "
                       "--json docs/serving.json", serving_table),
    "sharding": Section("sharding.json", "python -m benchmarks.sharding --json docs/sharding.json",
                        sharding_table),
    "throughput": Section("throughput.json", "python -m "
                          "benchmarks.throughput --json docs/throughput.json", throughput_table),
    "logits-blocks": Section("logits_blocks.json", "python -m benchmarks.logits_blocks --json "
                             "docs/logits_blocks.json", logits_blocks_table),
    "scale": Section("scale_runs.json", "the two recsys pipeline commands of the section",
                     scale_table),
    "http": Section("http.json", "python -m benchmarks.http --json docs/http.json", http_table),
    "index": Section("index.json", "python -m benchmarks.index --json docs/index.json "
                     "--png docs/img/index_tradeoff.png", index_table),
    "index-10m": Section("index_10m.json", "python -m benchmarks.index --json docs/index_10m.json "
                         "--png docs/img/index_tradeoff_10m.png --num-items 10000000 --no-graphs",
                         index_table),
    "faults": Section("faults.json", "python -m benchmarks.faults --json docs/faults.json",
                      faults_table, page="reliability.md"),
    "gpu": Section("gpu.json", "python -m benchmarks.gpu --json docs/gpu.json", gpu_table),
    "input-memory": Section("input_memory.json", "python -m benchmarks.input_memory --json "
                            "docs/input_memory.json", input_memory_table, page="data.md"),
    "shuffle-whole": Section("pipeline_whole.json", f"{SHUFFLE} --json docs/pipeline_whole.json",
                             shuffle_table, page="data.md"),
    "shuffle-window": Section("pipeline_window.json", f"{SHUFFLE} --set data.shuffle_window=16384 "
                              "--json docs/pipeline_window.json", shuffle_table, page="data.md"),
}


def render_block(name: str, docs: pathlib.Path) -> str:
    section = SECTIONS[name]
    path = docs / section.source
    if not path.is_file():
        return f"*Not yet measured: run `{section.command}`.*"
    try:
        return section.render(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError, IndexError, StopIteration, ZeroDivisionError) as e:
        raise ReportError(f"{path}: cannot render block {name!r}: {type(e).__name__}: {e}") from None


def regenerate(text: str, docs: pathlib.Path, page: str = "results.md") -> str:
    """The page with every block rendered again from the JSON in `docs`."""
    mine = [n for n, s in SECTIONS.items() if s.page == page]
    found = [m["name"] for m in BLOCK.finditer(text)]
    unknown = sorted(set(found) - set(mine))
    twice = sorted({n for n in found if found.count(n) > 1})
    missing = [n for n in mine if n not in found]
    if unknown or twice or missing:
        raise ReportError(f"{page} blocks: " + "; ".join(
            f"{what} {', '.join(names)}" for what, names in
            (("unknown", unknown), ("repeated", twice), ("missing", missing)) if names)
            + f" (known: {', '.join(mine)})")
    return BLOCK.sub(lambda m: f"<!-- report:{m['name']} -->\n{render_block(m['name'], docs)}\n"
                               f"<!-- /report:{m['name']} -->", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=pathlib.Path,
                   help="one markdown page (default: docs/results.md and docs/reliability.md); "
                        "its JSON inputs lie beside it")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 and print a diff if a page is stale")
    args = p.parse_args(argv)
    status = 0
    for page in [args.results] if args.results else PAGES:
        try:
            old = page.read_text()
            new = regenerate(old, page.parent, page.name if page.name in _pages() else "results.md")
        except (OSError, ReportError) as e:
            print(f"benchmarks.report: error: {e}", file=sys.stderr)
            return 2
        if new == old:
            continue
        if not args.check:
            page.write_text(new)
            continue
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                   f"{page} (committed)", f"{page} (regenerated)"))
        print(f"{page} is stale: run python -m benchmarks.report", file=sys.stderr)
        status = 1
    return status


def _pages() -> set[str]:
    return {s.page for s in SECTIONS.values()}


if __name__ == "__main__":
    sys.exit(main())
