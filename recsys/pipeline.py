"""The whole funnel, end to end: data -> retrieval -> ranker -> artifacts + index -> evaluation."""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from recsys import config as config_lib
from recsys import index as index_lib
from recsys import plan, sharding
from recsys.config import Config
from recsys.data import dataset as dataset_lib
from recsys.data.sources import load_raw
from recsys.eval import metrics as metrics_lib
from recsys.eval import protocol
from recsys.export import export_artifacts
from recsys.serve import Recommender
from recsys.train.loop import train_retrieval
from recsys.train.ranker import train_ranker

EVAL_BATCH = 256  # requests per recommend_batch call in the pipeline evaluation (its largest bucket)


def load_data(cfg: Config) -> dataset_lib.Dataset:
    raw = load_raw(cfg.data)
    return dataset_lib.build(raw, cfg.data)


def run(cfg: Config, workdir: pathlib.Path, *, export: bool = True) -> dict:
    """Trains both models, exports artifacts with a fresh index, evaluates every stage."""
    t0 = time.time()
    workdir = pathlib.Path(workdir)
    _prepare_workdir(cfg, workdir)
    ds = load_data(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    _log(f"{ds.name}: {ds.num_users} users, {ds.num_items} items, {len(ds.seq_items)} events; "
         f"mesh {dict(mesh.shape)}")
    _log(plan.format_plan(plan.for_dataset(cfg, ds, mesh)))

    lap = _Laps()
    retrieval = train_retrieval(cfg, ds, workdir, mesh)
    lap("train_retrieval")
    metrics = {"dataset": ds.name, "num_items": ds.num_items, "num_users": ds.num_users,
               **retrieval.metrics}
    ev = protocol.evaluate_retrieval(retrieval.model(), ds, "test", cfg.eval)
    lap("evaluate_retrieval")
    metrics.update({f"retrieval/{k}": v for k, v in ev.metrics.items()})
    r = cfg.serve.num_candidates
    metrics[f"retrieval/recall@{r}"] = float(np.mean(ev.ranks < r))

    ranker, ranker_inputs = (None, None)
    if cfg.ranker.steps > 0:
        ranker, ranker_inputs = train_ranker(cfg, ds, retrieval, workdir, mesh)
        metrics.update(ranker.metrics)
        lap("train_ranker")

    if export:
        two_tower = local_model(retrieval.model())  # every process gathers; process 0 writes
        ranker_model = local_model(ranker.model()) if ranker else None
    if export and jax.process_index() == 0:
        out, searcher = export_artifacts(
            workdir / "artifacts", cfg=cfg, ds=ds, two_tower=two_tower,
            item_vectors=ev.item_vectors, ranker=ranker_model,
            ranker_inputs=ranker_inputs, manifest={"metrics": dict(metrics)})
        lap("export")
        metrics["index/recall@10"] = index_recall(searcher, ev.item_vectors, ev.query_vectors)
        metrics.update(evaluate_pipeline(out, ds, ev.positions, cfg))
        lap("evaluate_pipeline")
    metrics.update({f"seconds/{stage}": s for stage, s in lap.seconds.items()})
    metrics["wall_seconds"] = time.time() - t0
    write_metrics(workdir, metrics)
    return metrics


def local_model(model):
    """The model whole on this process's first device (a collective across processes)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, sharding.local_copy(state))


def index_recall(searcher, items_VxD: np.ndarray, q_QxD: np.ndarray, k: int = 10) -> float:
    """Recall@k of the ANN index against exact search on the same query vectors."""
    valid = np.ones(len(items_VxD), bool)
    valid[0] = False
    exact = index_lib.ExactSearcher(items_VxD, valid)
    return index_lib.recall_at_k(searcher.search(q_QxD, k)[1], exact.search(q_QxD, k)[1])


def evaluate_pipeline(artifacts_dir: pathlib.Path, ds: dataset_lib.Dataset,
                      positions: np.ndarray, cfg: Config) -> dict:
    """HR@10 and NDCG@10 of the final lists the Recommender serves for each test event.

    Each request is the user's id at the event's time (the request context the ranker reads).
    The default ordering gives pipeline/*; MMR and exploration are scored beside it under
    ordering/mmr/* and ordering/explore/*, with intra-list diversity and catalogue coverage.
    """
    rec = Recommender.load(artifacts_dir)
    users = ds.users.raw(ds.seq_users[positions])
    times = ds.seq_times[positions]
    targets = ds.seq_items[positions]
    out = {}
    for policy in (None, "mmr", "explore"):
        ranked, ms = _served_lists(rec, ds, users, times, policy)
        prefix = "pipeline/" if policy is None else f"ordering/{policy}/"
        out[f"{prefix}hr@10"] = metrics_lib.hit_rate_at_k(ranked, targets, 10)
        out[f"{prefix}ndcg@10"] = metrics_lib.ndcg_at_k(ranked, targets, 10)
        prefix = "ordering/" if policy is None else prefix
        out[f"{prefix}intra_list_diversity"] = metrics_lib.intra_list_diversity(
            ranked, ds.features.item_genres)
        out[f"{prefix}catalog_coverage"] = metrics_lib.catalog_coverage(ranked, ds.num_items)
        if policy is None:
            out["pipeline/batched_ms_per_request"] = ms
    return out


def _served_lists(rec: Recommender, ds: dataset_lib.Dataset, users, times, policy):
    """[Q, 10] item rows served (-1 padded) and the mean batched milliseconds per request."""
    extra = {} if policy is None else {"ordering": policy}
    ranked = np.full((len(users), 10), -1, np.int64)
    totals = []
    for lo in range(0, len(users), EVAL_BATCH):
        out = rec.recommend_batch([{"user_id": u, "k": 10, "time": int(t), **extra}
                                   for u, t in zip(users[lo:lo + EVAL_BATCH],
                                                   times[lo:lo + EVAL_BATCH])])
        for i, o in enumerate(out):
            if o.items:
                ranked[lo + i, :len(o.items)] = ds.items.lookup(
                    np.asarray(o.items, dtype=ds.items.ids.dtype))
        totals.append(out[0].timings["total"] / len(out) if out else 0.0)
    return ranked, float(np.mean(totals))


def _prepare_workdir(cfg: Config, workdir: pathlib.Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config_lib.dumps(cfg))


def write_metrics(workdir: pathlib.Path, metrics: dict) -> None:
    """Merges into workdir/metrics.json (process 0 only), replacing the file atomically."""
    if jax.process_index() != 0:
        return
    path = pathlib.Path(workdir) / "metrics.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**old, **metrics}, indent=2, sort_keys=True,
                              default=lambda x: x.item() if hasattr(x, "item") else str(x)))
    tmp.replace(path)


class _Laps:
    """Wall seconds of consecutive stages: each call closes the stage that ran since the last."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.time()

    def __call__(self, stage: str) -> None:
        now = time.time()
        self.seconds[stage] = now - self._t
        self._t = now


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _trained(cfg: Config, workdir: pathlib.Path, *, require_checkpoint: bool):
    """Data, mesh and both models (restored from the workdir; trained if allowed and missing)."""
    workdir = pathlib.Path(workdir)
    if require_checkpoint and not (workdir / "checkpoints" / "retrieval").is_dir():
        raise config_lib.ConfigError(f"no checkpoint in {workdir}/checkpoints: "
                                     f"run `recsys train` with this --workdir first")
    _prepare_workdir(cfg, workdir)
    ds = load_data(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    _log(plan.format_plan(plan.for_dataset(cfg, ds, mesh)))
    retrieval = train_retrieval(cfg, ds, workdir, mesh)
    ranker = train_ranker(cfg, ds, retrieval, workdir, mesh) if cfg.ranker.steps else None
    return ds, retrieval, ranker


def train(cfg: Config, workdir: pathlib.Path) -> dict:
    """`recsys train`: both models; writes the train/* (and ranker/*) keys to metrics.json."""
    t0 = time.time()
    ds, retrieval, ranker = _trained(cfg, workdir, require_checkpoint=False)
    metrics = {"dataset": ds.name, "num_items": ds.num_items, "num_users": ds.num_users,
               **retrieval.metrics, **(ranker[0].metrics if ranker else {}),
               "wall_seconds": time.time() - t0}
    write_metrics(workdir, metrics)
    return metrics


def export(cfg: Config, workdir: pathlib.Path) -> pathlib.Path:
    """`recsys export`: artifacts (and a fresh index) from the workdir's checkpoints."""
    ds, retrieval, ranker = _trained(cfg, workdir, require_checkpoint=True)
    model = retrieval.model()
    items_VxD = protocol.item_vectors(model, ds.features)
    model = local_model(model)  # every process gathers; process 0 writes
    ranker_model = local_model(ranker[0].model()) if ranker else None
    out = pathlib.Path(workdir) / "artifacts"
    if jax.process_index() == 0:
        export_artifacts(out, cfg=cfg, ds=ds, two_tower=model, item_vectors=items_VxD,
                         ranker=ranker_model, ranker_inputs=ranker[1] if ranker else None)
    return out


def evaluate(cfg: Config, workdir: pathlib.Path) -> dict:
    """`recsys eval`: test metrics of retrieval (checkpoint), the index and the served pipeline."""
    workdir = pathlib.Path(workdir)
    ds, retrieval, _ = _trained(cfg, workdir, require_checkpoint=True)
    ev = protocol.evaluate_retrieval(retrieval.model(), ds, "test", cfg.eval)
    metrics = {"dataset": ds.name, "num_items": ds.num_items, "num_users": ds.num_users,
               **{f"retrieval/{k}": v for k, v in ev.metrics.items()}}
    artifacts_dir = workdir / "artifacts"
    if jax.process_index() == 0 and (artifacts_dir / "manifest.json").is_file():
        searcher = index_lib.load(artifacts_dir / "index")
        metrics["index/recall@10"] = index_recall(searcher, ev.item_vectors, ev.query_vectors)
        metrics.update(evaluate_pipeline(artifacts_dir, ds, ev.positions, cfg))
    write_metrics(workdir, metrics)
    return metrics


def rebuild_index(artifacts_dir: pathlib.Path, overrides: list[str]) -> dict:
    """`recsys index`: rebuilds the searcher with new index.* settings; returns its recall@10."""
    from recsys.artifacts import verify
    from recsys.export import rewrite_index
    manifest = verify(artifacts_dir)
    cfg = config_lib.apply_overrides(config_lib.from_dict(manifest["config"]), overrides)
    items_VxD = np.load(pathlib.Path(artifacts_dir) / "item_vectors.npy")
    searcher = rewrite_index(pathlib.Path(artifacts_dir), items_VxD, cfg)
    rng = np.random.default_rng(0)
    q_QxD = items_VxD[rng.integers(1, len(items_VxD), min(1000, len(items_VxD) - 1))]
    q_QxD = q_QxD + 0.1 * rng.standard_normal(q_QxD.shape).astype(np.float32)
    return {"index": cfg.index.kind, "num_items": len(items_VxD) - 1,
            "recall@10_on_item_neighbourhood_queries": index_recall(searcher, items_VxD, q_QxD)}
