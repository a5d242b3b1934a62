"""The whole funnel, end to end: train (retrieval, ranker) -> export (artifacts + index) -> evaluate.

`recsys pipeline` runs the three stages in one process; `recsys train`, `export` and `eval` run
one each. Export and eval only ever restore the models a finished `recsys train` left in the
workdir's checkpoints (never train); every stage's metrics go through `write_metrics`. While
training, scalars go to WORKDIR/metrics.jsonl and WORKDIR/tb (recsys.metrics_log); every long
stage reports its progress (recsys.progress).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import resource
import time

import jax
import numpy as np
from flax import nnx

from recsys import artifacts, features, plan, sharding
from recsys import config as config_lib
from recsys import index as index_lib
from recsys.config import Config, DataConfig
from recsys.data import dataset as dataset_lib
from recsys.data.sources import load_raw
from recsys.eval import metrics as metrics_lib
from recsys.eval import protocol
from recsys.export import CandidateVectors, export_artifacts
from recsys.metrics_log import MetricsLog
from recsys.models.ranker_inputs import RankerTables
from recsys.progress import Progress
from recsys.serve import Recommender
from recsys.train.loop import (
    Trained,
    load_retrieval,
    needs_events,
    prepared_vocabularies,
    train_retrieval,
)
from recsys.train.ranker import load_ranker, train_ranker

EVAL_BATCH = 256  # requests per recommend_batch call in the pipeline evaluation (its largest bucket)


@dataclasses.dataclass
class Models:
    """Both models, trained or restored, with the data and mesh they belong to."""

    ds: dataset_lib.Dataset | None  # None: trained from cfg.data.prepared alone (train only)
    mesh: jax.sharding.Mesh
    retrieval: Trained
    ranker: Trained | None  # None when cfg.ranker.steps == 0
    ranker_tables: RankerTables | None  # what the served ranker reads by row (from retrieval)

    @property
    def metrics(self) -> dict:
        """train/* and ranker/* keys (from the checkpoints' metadata when restored)."""
        return {**self.retrieval.metrics, **(self.ranker.metrics if self.ranker else {})}


def run(cfg: Config, workdir: pathlib.Path) -> dict:
    """Trains both models, exports artifacts with a fresh index, evaluates every stage."""
    t0 = time.time()
    lap = _Laps()
    models = train_models(cfg, workdir, lap)
    version = export_models(cfg, workdir, models, lap)
    metrics = evaluate_models(cfg, models, version, lap)
    return write_metrics(workdir, data_header(models.ds), {
        **models.metrics, **metrics, **{f"seconds/{k}": s for k, s in lap.seconds.items()},
        "wall_seconds": time.time() - t0, "memory/peak_rss_gib": peak_rss_gib()})


def peak_rss_gib() -> float:
    """The peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train(cfg: Config, workdir: pathlib.Path) -> dict:
    """`recsys train`: both models; writes the train/* (and ranker/*) keys to metrics.json.

    With data.prepared, and neither the ranker nor validation nor mining (which read users'
    histories: `loop.needs_events`), the event log is never loaded: training reads the prepared
    examples a batch at a time, so the process's memory does not grow with the events.
    """
    t0 = time.time()
    events = bool(cfg.ranker.steps > 0 or needs_events(cfg))
    models = train_models(cfg, workdir, load_events=events)
    header = data_header(models.ds) if models.ds is not None else prepared_header(cfg.data)
    return write_metrics(workdir, header, {**models.metrics, "wall_seconds": time.time() - t0})


def export(cfg: Config, workdir: pathlib.Path) -> pathlib.Path | None:
    """`recsys export`: a new artifacts version from the workdir's checkpoints (never trains)."""
    return export_models(cfg, workdir, load_models(cfg, workdir))


def evaluate(cfg: Config, workdir: pathlib.Path) -> dict:
    """`recsys eval`: test metrics of the checkpoint's retrieval, the published index and the
    served pipeline (never trains)."""
    models = load_models(cfg, workdir)
    root = pathlib.Path(workdir) / artifacts.ROOT
    version = artifacts.published(root) if jax.process_index() == 0 else None
    return write_metrics(workdir, data_header(models.ds), evaluate_models(cfg, models, version))


def train_models(cfg: Config, workdir: pathlib.Path, lap: _Laps | None = None, *,
                 load_events: bool = True) -> Models:
    """Trains (resuming from the workdir's checkpoints) the retrieval model, then the ranker.
    `load_events=False` (cfg.data.prepared, no ranker): the retrieval model alone, from the
    prepared examples, without loading the events (Models.ds is None)."""
    lap = lap or _Laps()
    workdir = pathlib.Path(workdir)
    ds, mesh = _setup(cfg, workdir, training=True, load_events=load_events)
    lap("load_data")
    with MetricsLog(workdir, started=lap.started) as log:  # closed on errors too
        retrieval = train_retrieval(cfg, ds, workdir, mesh, log=log)
        lap("train_retrieval")
        ranker, tables = None, None
        if cfg.ranker.steps > 0:
            ranker, tables = train_ranker(cfg, ds, retrieval, workdir, mesh, log=log)
            lap("train_ranker")
    return Models(ds, mesh, retrieval, ranker, tables)


def load_models(cfg: Config, workdir: pathlib.Path) -> Models:
    """Restores both models of a finished `recsys train` (CheckpointError when there are none)."""
    workdir = pathlib.Path(workdir)
    ds, mesh = _setup(cfg, workdir, training=False)
    retrieval = load_retrieval(cfg, ds, workdir, mesh)
    ranker, tables = None, None
    if cfg.ranker.steps > 0:
        ranker, tables = load_ranker(cfg, ds, retrieval, workdir, mesh)
    return Models(ds, mesh, retrieval, ranker, tables)


def export_models(cfg: Config, workdir: pathlib.Path, models: Models,
                  lap: _Laps | None = None) -> pathlib.Path | None:
    """Publishes the models as a new version of WORKDIR/artifacts; returns it (None on processes
    other than 0, which only help gather the models)."""
    lap = lap or _Laps()
    retrieval = models.retrieval.model()
    two_tower = local_model(retrieval)  # every process gathers; process 0 writes
    ranker = local_model(models.ranker.model()) if models.ranker else None
    queries_QxD = tuning_queries(retrieval, models.ds, cfg)
    version = None
    if jax.process_index() == 0:
        version, _ = export_artifacts(
            pathlib.Path(workdir) / artifacts.ROOT, cfg=cfg, ds=models.ds, two_tower=two_tower,
            # computed and written block by block: never [V, D] in memory at once
            item_vectors=CandidateVectors(two_tower, models.ds.features), ranker=ranker, ranker_inputs=models.ranker_tables,
            manifest={"metrics": models.metrics}, tuning_queries=queries_QxD)
    lap("export")
    return version


def tuning_queries(retrieval, ds: dataset_lib.Dataset, cfg: Config) -> np.ndarray:
    """The query tower's vectors of a seeded sample of validation events (never test ones):
    the real queries the index is tuned on; [Q, D], Q <= index.tuning_queries."""
    positions = ds.eval_positions("val")
    if len(positions) > cfg.index.tuning_queries:
        keep = np.random.default_rng(0).choice(len(positions), cfg.index.tuning_queries, False)
        positions = positions[np.sort(keep)]
    return protocol.query_vectors(retrieval, ds, positions)


def evaluate_models(cfg: Config, models: Models, version: pathlib.Path | None,
                    lap: _Laps | None = None) -> dict:
    """Test metrics: retrieval/* of the model; with an artifacts `version`, index/recall@10 of its
    index and pipeline/* (and ordering/*) of the Recommender serving it (process 0)."""
    lap = lap or _Laps()
    ds = models.ds
    with Progress("evaluate retrieval", 1, unit="evaluations") as progress:
        ev = protocol.evaluate_retrieval(models.retrieval.model(), ds, "test", cfg.eval)
        progress.update()
    r = cfg.serve.num_candidates
    metrics = {**{f"retrieval/{k}": v for k, v in ev.metrics.items()},
               f"retrieval/recall@{r}": float(np.mean(ev.ranks < r))}
    lap("evaluate_retrieval")
    if version is not None:
        with Progress("load recommender", 1, unit="loads") as progress:  # compiles, warms up
            rec = Recommender.load(version)
            progress.update()
        with Progress("index recall", 1, unit="evaluations") as progress:  # ANN against exact
            metrics["index/recall@10"] = index_recall(rec.artifacts.searcher, ev.item_vectors,
                                                      ev.query_vectors)
            progress.update()
        metrics.update(index_metrics(rec.artifacts.manifest.get("index", {})))
        metrics.update(evaluate_pipeline(rec, ds, ev.positions))
        lap("evaluate_pipeline")
    return metrics


def index_metrics(index: dict) -> dict:
    """index/* keys of an artifacts manifest's index entry: how it was tuned, if it was."""
    tuned = index.get("tuning")
    if not tuned:
        return {"index/tuned": False}
    return {"index/tuned": True, "index/fallback": tuned["fallback"],
            "index/target_recall": tuned["target_recall"],
            f"index/tuned_recall@{tuned['k']}": tuned["recall"],
            "index/tuning_queries": tuned["queries"],
            "index/qps_per_cpu_s": tuned["qps_per_cpu_s"],
            "index/exact_qps_per_cpu_s": tuned["exact_qps_per_cpu_s"]}


def data_header(ds: dataset_lib.Dataset) -> dict:
    """The keys metrics.json opens with: which data, its sizes."""
    return {"dataset": ds.name, "num_items": ds.num_items, "num_users": ds.num_users,
            "data/unknown_item_events": ds.unknown_item_events}


def prepared_header(cfg: DataConfig) -> dict:
    """`data_header` of the data a prepared directory was written from (its spec.json)."""
    spec = _prepared_spec(cfg)
    return {"dataset": spec["dataset"], "num_items": spec["num_items"],
            "num_users": spec["num_users"]}


def _prepared_spec(cfg: DataConfig) -> dict:
    """cfg.prepared's spec.json, read as is (training opens and checks the directory)."""
    from recsys.data.prepare import SPEC  # TFDS only when asked for
    path = pathlib.Path(cfg.prepared) / SPEC
    if not path.is_file():  # PreparedData.open's one line says what is wrong with it
        from recsys.data.grain_input import PreparedData
        PreparedData.open(cfg.prepared)
    return json.loads(path.read_text())


def write_metrics(workdir: pathlib.Path, header: dict, metrics: dict) -> dict:
    """The one writer of workdir/metrics.json: the data header plus `metrics`, merged into what
    earlier commands wrote (process 0 only; the file is replaced atomically). Returns what it
    added."""
    metrics = {**header, **metrics}
    if jax.process_index() != 0:
        return metrics
    path = pathlib.Path(workdir) / "metrics.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**old, **metrics}, indent=2, sort_keys=True,
                              default=lambda x: x.item() if hasattr(x, "item") else str(x)))
    tmp.replace(path)
    return metrics


def load_data(cfg: DataConfig) -> dataset_lib.Dataset:
    return dataset_lib.build(load_raw(cfg), cfg)


def local_model(model):
    """The model whole on this process's first device (a collective across processes)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, sharding.local_copy(state))


def index_recall(searcher, items_VxD: np.ndarray, q_QxD: np.ndarray, k: int = 10) -> float:
    """Recall@k of the ANN index against exact search on the same query vectors."""
    exact = index_lib.ExactSearcher(items_VxD, features.valid_rows(len(items_VxD)))
    return index_lib.recall_at_k(searcher.search(q_QxD, k)[1], exact.search(q_QxD, k)[1])


def evaluate_pipeline(rec: Recommender, ds: dataset_lib.Dataset, positions: np.ndarray) -> dict:
    """HR@10 and NDCG@10 of the final lists the Recommender serves for each test event.

    Each request is the user's id at the event's time (the request context the ranker reads).
    The default ordering gives pipeline/*; MMR and exploration are scored beside it under
    ordering/mmr/* and ordering/explore/*, with intra-list diversity and catalogue coverage.
    """
    users = ds.users.raw(ds.seq_users[positions])
    times = ds.seq_times[positions]
    targets = ds.seq_items[positions]
    out = {}
    policies = (None, "mmr", "explore")
    with Progress("evaluate pipeline", len(policies) * len(users), unit="requests") as progress:
        served = {p: _served_lists(rec, ds, users, times, p, progress) for p in policies}
    for policy, (ranked, ms) in served.items():
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


def _served_lists(rec: Recommender, ds: dataset_lib.Dataset, users, times, policy,
                  progress: Progress):
    """[Q, 10] item rows served (-1 padded) and the mean batched milliseconds per request; each
    request counts one on `progress`."""
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
        progress.update(len(out))
    return ranked, float(np.mean(totals))


def _setup(cfg: Config, workdir: pathlib.Path, *, training: bool, load_events: bool = True):
    """(dataset, mesh), and the memory plan logged. Training writes the resolved config into the
    workdir (made if need be); restoring leaves the workdir as training left it. Without
    `load_events` the dataset is None and the plan comes from cfg.data.prepared's spec."""
    if training:
        workdir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(config_lib.dumps(cfg))
    mesh = sharding.make_mesh(cfg.mesh)
    if not load_events:
        spec = _prepared_spec(cfg.data)  # train_retrieval opens and checks the directory
        _log(f"{spec['dataset']}: {spec['num_examples']} prepared training examples read from "
             f"{cfg.data.prepared} a batch at a time (the events are not loaded); "
             f"mesh {dict(mesh.shape)}")
        state = plan.abstract_two_tower_state(cfg, prepared_vocabularies(spec), mesh)
        _log(plan.format_plan(plan.memory_plan(state, cfg, mesh)))
        return None, mesh
    ds = load_data(cfg.data)
    _log(f"{ds.name}: {ds.num_users} users, {ds.num_items} items, {len(ds.seq_items)} events; "
         f"mesh {dict(mesh.shape)}")
    _log(plan.format_plan(plan.for_dataset(cfg, ds, mesh)))
    return ds, mesh


class _Laps:
    """Wall seconds of consecutive stages: each call closes the stage that ran since the last."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = self._t = time.time()

    def __call__(self, stage: str) -> None:
        now = time.time()
        self.seconds[stage] = now - self._t
        self._t = now


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def rebuild_index(artifacts_dir: pathlib.Path, overrides: list[str]) -> dict:
    """`recsys index`: publishes a version with the index rebuilt (and tuned) by new index.*
    settings, without retraining; returns what was measured.

    The real queries come from the bundle itself: what serving computes for a seeded sample of
    known users from their stored histories (Recommender.user_query_vectors).
    """
    from recsys.export import rewrite_index
    with artifacts.reading(artifacts_dir) as version:  # a new version is published beside it
        manifest = artifacts.verify(version)
        cfg = config_lib.apply_overrides(config_lib.from_dict(manifest["config"]), overrides)
        rec = Recommender.load(version, warmup=False)
        queries_QxD = rec.user_query_vectors(rec.known_users(cfg.index.tuning_queries))
        items_VxD = rec.artifacts.item_vectors
        new, searcher = rewrite_index(version, items_VxD, cfg, queries_QxD)
    out = {"version": new.name, "index": cfg.index.kind, "num_items": len(items_VxD) - 1,
           f"recall@{cfg.index.recall_k}_on_user_queries": index_recall(
               searcher, items_VxD, queries_QxD, cfg.index.recall_k)}
    return {**out, **index_metrics(artifacts.read_manifest(new).get("index", {}))}

