"""Pictures of a finished run as PNG files (`recsys report`): training curves, HR@K against the
popularity baseline, the index's recall against its speed, and per-stage serving latency.

Each picture is drawn from what the workdir holds (metrics.jsonl, metrics.json, config.json,
artifacts/); one whose inputs are missing is skipped with a one-line reason. matplotlib is an
optional dependency (`pip install 'recsys[report]'`), imported only here and only when drawing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import numpy as np

PICTURES = ("curves", "hr_at_k", "index", "latency")  # each is written as <name>.png
INSTALL_HINT = "pip install 'recsys[report]'"
K = 10  # list length of the index-recall and latency pictures
WARMUP_REQUESTS = 20  # recommend calls before the latency timings start
DPI = 100


class ReportError(ValueError):
    """No report can be made at all (no matplotlib, no workdir, nothing to draw); names why."""


class Skip(Exception):
    """One picture cannot be drawn from what the workdir holds; the message says what is missing."""


@dataclasses.dataclass
class Report:
    written: dict[str, pathlib.Path]  # picture name -> PNG written
    skipped: dict[str, str]  # picture name -> why it was not drawn
    notes: list[str]  # parts left out of pictures that were drawn


def render(workdir: str | pathlib.Path, out: str | pathlib.Path | None = None, *,
           requests: int = 300, queries: int = 1000) -> Report:
    """Draws every picture it can from `workdir` into `out` (default WORKDIR/report).

    Args:
      workdir: a run's workdir (`recsys pipeline` / `train` / `export` write one).
      out: directory for the PNGs, created when needed.
      requests: timed `Recommender.recommend` calls of the latency picture.
      queries: users whose query vectors measure the index's recall and speed.
    """
    figure_class()  # fail before any slow work when matplotlib is missing
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise ReportError(f"--workdir {workdir}: not a directory")
    out = pathlib.Path(out) if out is not None else workdir / "report"
    report = Report({}, {}, [])
    rec, no_rec = load_recommender(workdir)
    draw = {"curves": lambda: draw_curves(workdir),
            "hr_at_k": lambda: draw_hr_at_k(workdir, report.notes),
            "index": lambda: draw_index(_need(rec, no_rec), queries),
            "latency": lambda: draw_latency(_need(rec, no_rec), requests)}
    for name in PICTURES:
        try:
            fig = draw[name]()
        except Skip as e:
            report.skipped[name] = str(e)
            continue
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=DPI)
        report.written[name] = path
    if not report.written:
        raise ReportError(f"nothing to draw in {workdir}: " + "; ".join(
            f"{name}: {why}" for name, why in report.skipped.items()))
    return report


def figure_class():
    """matplotlib's Figure (no pyplot: no global state, no display); ReportError when absent."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError(f"matplotlib is not installed; {INSTALL_HINT}") from None
    return Figure


def _figure(ncols: int, width: float, height: float):
    fig = figure_class()(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _need(rec, why: str):
    if rec is None:
        raise Skip(why)
    return rec


# ---- inputs --------------------------------------------------------------------------------


def read_jsonl(path: pathlib.Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl, one per line; lines that are not objects are skipped."""
    if not path.is_file():
        raise Skip(f"no {path.name} in {path.parent} (training writes it)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # e.g. a line cut short by a killed run
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise Skip(f"no {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise Skip(f"{path} is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise Skip(f"{path} is not a JSON object")
    return data


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def series(rows: list[dict], want) -> dict[tuple[str, str], tuple[list, list]]:
    """{(stage, key): (steps, values)} of the numeric keys `want(key)` accepts, in step order.

    A step written twice (a resumed run repeats the steps after its last checkpoint) keeps the
    later line's value.
    """
    points: dict[tuple[str, str], dict] = {}
    for row in rows:
        if not _number(row.get("step")):
            continue
        for key, value in row.items():
            if key not in ("step", "time") and want(key) and _number(value):
                points.setdefault((str(row.get("stage", "run")), key), {})[row["step"]] = value
    return {name: (sorted(p), [p[s] for s in sorted(p)]) for name, p in points.items()}


def is_loss(key: str) -> bool:
    return key.split("/")[-1] == "loss"


def is_validation_at_10(key: str) -> bool:
    """val/hr@10, val/ndcg@10 (also spelled val_hr@10, ranker/val_ndcg@10)."""
    parts = key.split("/")
    return key.endswith("@10") and ("val" in parts or parts[-1].startswith("val_"))


def hit_rates(metrics: dict, prefix: str) -> dict[int, float]:
    """{K: HR@K} from metrics.json keys `prefix/hr@K`."""
    pattern = re.compile(rf"{re.escape(prefix)}/hr@(\d+)")
    return {int(m.group(1)): float(v) for key, v in metrics.items()
            if (m := pattern.fullmatch(key)) and _number(v)}


def load_recommender(workdir: pathlib.Path):
    """(Recommender of WORKDIR/artifacts, "") or (None, why there is none)."""
    from recsys import artifacts
    from recsys.index import IndexLoadError
    from recsys.serve import Recommender
    root = workdir / artifacts.ROOT
    if not root.is_dir():
        return None, f"no {artifacts.ROOT}/ in {workdir} (recsys export writes it)"
    try:
        return Recommender.load(root), ""
    except (artifacts.ArtifactError, IndexLoadError) as e:
        return None, f"artifacts unusable: {e}"


def sample_users(rec, n: int, seed: int = 0) -> list:
    """Up to n raw user ids of the artifacts, a seeded sample in vocabulary order."""
    if len(rec.artifacts.users.ids) == 0:
        raise Skip("the artifacts hold no users")
    return rec.known_users(n, seed)


# ---- (a) training curves ------------------------------------------------------------------


def draw_curves(workdir: pathlib.Path):
    """Training loss and validation metrics against the step, one line per stage."""
    rows = read_jsonl(workdir / "metrics.jsonl")
    loss, val = series(rows, is_loss), series(rows, is_validation_at_10)
    if not loss and not val:
        raise Skip("metrics.jsonl has no step with a loss or a validation HR@10 / NDCG@10")
    fig, (ax_loss, ax_val) = _figure(2, 11, 4)
    colours = {stage: f"C{i}" for i, stage in enumerate(dict.fromkeys(
        stage for stage, _ in [*loss, *val]))}
    for ax, lines in ((ax_loss, loss), (ax_val, val)):
        for (stage, key), (steps, values) in sorted(lines.items()):
            name = key.split("/")[-1].removeprefix("val_")
            ax.plot(steps, values, marker="" if len(steps) > 20 else "o", markersize=3,
                    color=colours[stage], linestyle="--" if "ndcg" in name else "-",
                    label=stage if ax is ax_loss else f"{stage}: {name}")
        if lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no values recorded", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("training step (of each stage)")
        ax.grid(alpha=0.3)
    ax_loss.set_title("training loss")
    ax_loss.set_ylabel("loss (cross-entropy, nats per example)")
    ax_val.set_title("validation (HR@10 and NDCG@10 of held-out events)")
    ax_val.set_ylabel("validation metric (0 to 1)")
    fig.suptitle(f"Training curves of {workdir.name} (from metrics.jsonl)")
    return fig


# ---- (b) HR@K against popularity --------------------------------------------------------


def draw_hr_at_k(workdir: pathlib.Path, notes: list[str]):
    """HR@K of retrieval and the pipeline (metrics.json) beside popularity on the same split."""
    metrics = _read_json(workdir / "metrics.json")
    retrieval, served = hit_rates(metrics, "retrieval"), hit_rates(metrics, "pipeline")
    if not retrieval and not served:
        raise Skip("metrics.json has no retrieval/hr@K or pipeline/hr@K (recsys eval writes them)")
    k_max = max([*retrieval, *served, 100])
    fig, (ax,) = _figure(1, 7.5, 4.5)
    try:
        ranks = popularity_ranks(workdir)
        hr_K = np.cumsum(np.bincount(np.minimum(ranks, k_max), minlength=k_max + 1))[:k_max]
        ax.plot(np.arange(1, k_max + 1), hr_K / len(ranks), color="0.5",
                label="popularity (most frequent training items)")
    except Skip as e:
        notes.append(f"hr_at_k: popularity left out: {e}")
    if retrieval:
        ks = sorted(retrieval)
        ax.plot(ks, [retrieval[k] for k in ks], "o-", label="retrieval (two-tower, exact top-K)")
    if served:
        ks = sorted(served)
        ax.plot(ks, [served[k] for k in ks], "*", markersize=14,
                label="pipeline (retrieve, filter, rank, order)")
    ax.set_xlabel("K (length of the recommended list, items)")
    ax.set_ylabel("HR@K (share of test users whose\nheld-out item is in the top K)")
    ax.set_xlim(0, k_max + 1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"HR@K on the test split: {metrics.get('dataset', workdir.name)}, "
                 f"{metrics.get('num_users', '?')} users, {metrics.get('num_items', '?')} items")
    return fig


def popularity_ranks(workdir: pathlib.Path) -> np.ndarray:
    """0-based test ranks of the popularity baseline on the data of WORKDIR/config.json: [Q].

    The evaluation protocol's own users, exclusions and tie rule (recsys.eval); items are scored
    by how often they are a training or validation target, as benchmarks.baselines does.
    """
    from recsys import config as config_lib
    from recsys import pipeline
    from recsys.data.schema import DataError
    from recsys.eval import protocol
    cfg = config_lib.from_dict(_read_json(workdir / "config.json"))
    try:
        ds = pipeline.load_data(cfg.data)
    except (config_lib.ConfigError, DataError, FileNotFoundError) as e:
        raise Skip(f"the run's data cannot be loaded ({e})") from None
    return protocol.popularity_ranks(ds, "test", cfg.eval)


# ---- (c) index recall against speed -------------------------------------------------------


def user_query_vectors(rec, n: int) -> np.ndarray:
    """The query vectors serving computes for up to n known users (stored histories): [Q, D]."""
    return rec.user_query_vectors(sample_users(rec, n))


def searcher_settings(searcher):
    """(series, label, searcher, published) per query-time setting: a ScaNN tree-AH index (or
    each shard of a sharded one) sweeps leaves_to_search at three reorder depths around its own;
    any other index has only its published setting."""
    params = getattr(searcher, "params", None)
    if getattr(params, "mode", None) != "tree_ah":
        mode = f" {params.mode}" if params is not None else ""
        yield f"published index ({searcher.kind}{mode})", "", searcher, True
        return
    n = params.num_leaves
    leaves = sorted({min(2 ** i, n) for i in range(math.ceil(math.log2(n)) + 1)}
                    | {params.leaves_to_search})
    for reorder in sorted({max(K, params.reorder // 4), params.reorder, 4 * params.reorder}):
        for count in leaves:
            yield (f"ScaNN tree-AH, reorder {reorder}", f"{count}",
                   searcher.with_query_params(count, reorder),  # the same built index
                   (count, reorder) == (params.leaves_to_search, params.reorder))


def index_sweep(searcher, items_VxD: np.ndarray, q_QxD: np.ndarray, k: int = K) -> list[dict]:
    """Recall@k against exact search, and batched queries per second, of each setting.

    Returns:
      [{"series", "label", "recall", "qps" (per CPU-second), "published"}], exact search
      itself first.
    """
    from recsys import features
    from recsys import index as index_lib
    exact = index_lib.ExactSearcher(items_VxD, features.valid_rows(len(items_VxD)))
    truth_QxK, qps = _timed_search(exact, q_QxD, k)
    points = [{"series": "exact search (numpy)", "label": "", "recall": 1.0, "qps": qps,
               "published": False}]
    for name, label, variant, published in searcher_settings(searcher):
        rows_QxK, qps = _timed_search(variant, q_QxD, k)
        points.append({"series": name, "label": label, "qps": qps, "published": published,
                       "recall": index_lib.recall_at_k(rows_QxK, truth_QxK)})
    return points


def _timed_search(searcher, q_QxD: np.ndarray, k: int):
    """(rows [Q, k], queries per CPU-second as recsys.index.tuning measures them: comparable
    with the tuning figures in the manifest)."""
    from recsys.index import tuning
    _, rows_QxK = searcher.search(q_QxD, k)
    return rows_QxK, tuning.qps_per_cpu_s(searcher, q_QxD, k)


def draw_index(rec, queries: int):
    """Recall@10 against queries per second of the published index's settings and exact search."""
    q_QxD = user_query_vectors(rec, queries)
    points = index_sweep(rec.artifacts.searcher, rec.artifacts.item_vectors, q_QxD)
    fig, (ax,) = _figure(1, 8, 5)
    for name in dict.fromkeys(p["series"] for p in points):
        group = [p for p in points if p["series"] == name]
        style = "ks" if name.startswith("exact") else ("o-" if len(group) > 1 else "o")
        ax.plot([p["recall"] for p in group], [p["qps"] for p in group], style, label=name,
                markersize=4)
        for p in group if any(p["published"] for p in group) else ():  # one series labelled
            if p["label"]:
                ax.annotate(p["label"], (p["recall"], p["qps"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 2))
    for p in points:
        if p["published"]:
            ax.plot(p["recall"], p["qps"], "o", markersize=14, fillstyle="none", color="red",
                    label="published setting")
    ax.set_yscale("log")
    ax.set_xlim(max(0.0, min(p["recall"] for p in points) - 0.05), 1.01)
    ax.set_xlabel(f"recall@{K} against exact search (share of the true top {K} found)")
    ax.set_ylabel(f"queries per CPU-second (batches of {len(q_QxD)})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    knob = " (labels: leaves searched, of the published reorder)" if any(
        p["label"] for p in points) else ""
    fig.suptitle(f"Index recall@{K} against speed, {rec.artifacts.searcher.kind} over "
                 f"{len(rec.artifacts.item_vectors) - 1} items;\nqueries: serving query vectors of "
                 f"{len(q_QxD)} known users{knob}", fontsize=11)
    return fig


# ---- (d) per-stage latency ----------------------------------------------------------------


def time_requests(rec, n: int) -> list[dict[str, float]]:
    """Per-stage milliseconds of n single `recommend` calls for known users, after a warm-up."""
    users = sample_users(rec, n, seed=1)
    users = [users[i % len(users)] for i in range(n)]
    for u in users[:WARMUP_REQUESTS]:
        rec.recommend(user_id=u, k=K)
    return [rec.recommend(user_id=u, k=K).timings for u in users]


def draw_latency(rec, requests: int):
    """One histogram of milliseconds per stage (and the total) over `requests` calls."""
    from recsys.serve.recommender import STAGES
    timings = time_requests(rec, requests)
    stages = [*STAGES, "total"]
    fig, axes = _figure(len(stages), 14, 3.6)
    for ax, stage in zip(axes, stages):
        ms = np.array([t[stage] for t in timings])
        p50, p99 = np.percentile(ms, [50, 99])
        # The axis ends a little past p99: the slowest 1% (a busy core, a GC pause) would
        # squeeze the rest into one bar. They are counted in a note instead.
        top = 1.2 * p99 if p99 > 0 else 1.0
        ax.hist(ms[ms <= top], bins=30, range=(0.0, top), color="C3" if stage == "total" else "C0")
        ax.axvline(p50, color="k", linewidth=1)
        ax.axvline(p99, color="k", linewidth=1, linestyle="--")
        beyond = int(np.sum(ms > top))
        if beyond:
            ax.text(0.98, 0.95, f"{beyond} above {top:.2f} ms\n(max {ms.max():.1f} ms)",
                    ha="right", va="top", fontsize=8, transform=ax.transAxes,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
        ax.set_title(f"{stage}: p50 {p50:.2f} ms, p99 {p99:.2f} ms", fontsize=9)
        ax.set_xlabel("milliseconds per request")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("requests")
    fig.suptitle(f"Serving latency per stage: {len(timings)} Recommender.recommend calls "
                 f"(one request each, k={K}, known users, after {WARMUP_REQUESTS} warm-up calls; "
                 "lines: p50 solid, p99 dashed)")
    return fig
