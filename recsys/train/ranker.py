"""Ranker training on events a retrieval model never saw: K-fold choice of the steps, then one fit."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recsys import sharding
from recsys.config import Config, ConfigError, RankerConfig
from recsys.data.dataset import Dataset
from recsys.eval import metrics, protocol
from recsys.metrics_log import MetricsLog
from recsys.models import layers, losses
from recsys.models.ranker import Ranker
from recsys.models.ranker_inputs import RankerTables, numeric_stats
from recsys.progress import Progress
from recsys.train import checkpoint, steps
from recsys.train import state as state_lib
from recsys.train.loop import CHECKPOINTS, Trained, train_retrieval, vocabularies
from recsys.train.ranker_data import (
    Events,
    batch_inputs,
    event_log_timeline,
    holdout_dataset,
    listwise_rows,
    make_events,
    make_tables,
    retrieved_only,
)

# Model fields that decide the ranker's parameter shapes: other values refuse a checkpoint.
SHAPE_FIELDS = ("hidden_dims", "embed_dim", "cross_layers", "cross_rank", "structure", "use_ids",
                "use_vectors")
EVAL_BLOCK = 64  # validation events scored per jitted call (one compiled shape)
STATS_EVENTS = 1024  # training events whose candidates give the input standardisation
CV_EVAL_EVENTS = 4096  # held-out events scored per K-fold evaluation (a seeded subset beyond)
SHADOW = "shadow_retrieval"  # stage name (progress, metrics.jsonl) of a feature retrieval model


def ranker_loss(model, batch: dict, rc: RankerConfig):
    """Column 0 is the true item: listwise softmax over the row, or pointwise sigmoid BCE."""
    scores_BxN = model(batch)
    if rc.loss == "bce":
        labels_BxN = jnp.zeros_like(scores_BxN).at[:, 0].set(1.0)
        return optax.sigmoid_binary_cross_entropy(scores_BxN, labels_BxN).sum(1).mean()
    return losses.softmax_cross_entropy(scores_BxN, jnp.zeros(scores_BxN.shape[0], jnp.int32))


def _ranker_loss_of(model, batch: dict, _tc, *, rc: RankerConfig):
    return ranker_loss(model, batch, rc)  # make_train_step hands every loss the TrainConfig


def make_optimizer(rc: RankerConfig) -> optax.GradientTransformation:
    """Adam at ranker.learning_rate; adamw when ranker.weight_decay > 0 (never on dot_scale)."""
    if rc.weight_decay <= 0:
        return optax.adam(rc.learning_rate)
    return optax.adamw(rc.learning_rate, weight_decay=rc.weight_decay,
                       mask=lambda params: jax.tree.map(lambda x: x.ndim > 0, params))


def build_model(cfg: Config, ds: Dataset, rngs: nnx.Rngs, stats=None) -> Ranker:
    return Ranker(cfg.ranker, vocabularies(ds), ds.history_len, rngs, stats,
                  vector_dim=cfg.model.out_dim, temperature=cfg.model.temperature)


def train_ranker(cfg: Config, ds: Dataset, retrieval: Trained, workdir: pathlib.Path,
                 mesh: jax.sharding.Mesh, *, log: MetricsLog | None = None,
                 ) -> tuple[Trained, RankerTables]:
    """Trains the ranker; returns it and the tables serving reads (from the served retrieval).

    Where events come from is ranker.events (see `ranker_events`); the ranker reads the
    features of the retrieval model that never trained on them, as serving will at test time.
    Scalars (the ranker's and a shadow retrieval model's) go to `log` (default: a MetricsLog of
    workdir, closed at the end).
    """
    workdir = pathlib.Path(workdir)
    with contextlib.ExitStack() as closing:
        if log is None:
            log = closing.enter_context(MetricsLog(workdir))
        # Data: the feature model, its tables, and its events with exact top-R candidates each.
        timeline = event_log_timeline(ds)
        served_items = protocol.item_vectors(retrieval.model(), ds.features)
        feature_model, positions = ranker_events(cfg, ds, retrieval, workdir, mesh, log)
        with Progress("ranker events", 1, unit="event sets") as progress:
            items_VxD = (served_items if feature_model is retrieval
                         else protocol.item_vectors(feature_model.model(), ds.features))
            tables = ranker_tables(ds, cfg.data.trained_on, items_VxD, timeline)
            events = make_events(feature_model.model(), ds, positions, items_VxD,
                                 cfg.serve.num_candidates)
            progress.update()
            progress.set_postfix(events=len(positions))
        # The ranker learns the features of these two models: when a resumed run changed either,
        # the ranker saved for the old ones is stale and is trained again.
        made_for = {"retrieval/steps": retrieval.metrics["train/steps"],
                    "feature_model/steps": feature_model.metrics["train/steps"]}
        trained = fit_ranker(cfg, ds, tables, events, workdir, mesh, made_for, log)
    return trained, ranker_tables(ds, cfg.data.trained_on, served_items, timeline)


def load_ranker(cfg: Config, ds: Dataset, retrieval: Trained, workdir: pathlib.Path,
                mesh: jax.sharding.Mesh) -> tuple[Trained, RankerTables]:
    """The ranker of workdir's finished training run and the tables serving reads; never trains.

    Its input statistics are part of its state. A missing ranker checkpoint, or one made for
    other retrieval models than the workdir's now (stale), raises checkpoint.CheckpointError.
    """
    workdir = pathlib.Path(workdir)
    graphdef, abstract = state_lib.abstract(lambda rngs: build_model(cfg, ds, rngs),
                                            make_optimizer(cfg.ranker), cfg.train.seed + 1, mesh)
    served_steps = retrieval.metrics["train/steps"]
    feature_dir = feature_model_dir(cfg, workdir)
    feature_meta = ({"step": served_steps} if feature_dir is None
                    else checkpoint.latest_meta(feature_dir / CHECKPOINTS) or {})
    made_for = {"retrieval/steps": served_steps, "feature_model/steps": feature_meta.get("step")}
    state, meta = checkpoint.load_trained(workdir / "checkpoints" / "ranker", abstract,
                                          _checkpoint_meta(cfg, ds), made_for=made_for)
    out = {k: v for k, v in meta.items() if k.startswith("ranker/")}
    tables = ranker_tables(ds, cfg.data.trained_on, protocol.item_vectors(retrieval.model(), ds.features),
                           event_log_timeline(ds))
    return Trained(graphdef, state, out), tables


def ranker_tables(ds: Dataset, trained_on: str, items_VxD: np.ndarray, timeline) -> RankerTables:
    """What the ranker reads by item or user row, given a retrieval model's item vectors [V, D]
    (popularity from the events retrieval trained on: data.trained_on)."""
    counts = ds.item_counts(ds.train_positions(trained_on))
    return make_tables(ds, items_VxD, np.log1p(counts).astype(np.float32), timeline)


def feature_model_dir(cfg: Config, workdir: pathlib.Path) -> pathlib.Path | None:
    """The workdir of the retrieval model whose features the ranker learns (None: the served one)."""
    if cfg.ranker.events == "validation" and cfg.data.trained_on != "train":
        return pathlib.Path(workdir) / "ranker_validation"
    if cfg.ranker.events == "holdout":
        return pathlib.Path(workdir) / "ranker_holdout"
    return None


def ranker_events(cfg: Config, ds: Dataset, retrieval: Trained, workdir: pathlib.Path, mesh,
                  log: MetricsLog | None = None):
    """(feature retrieval model, event positions) the ranker learns from.

    validation: every user's validation event, scored by a retrieval model trained without it
      (trained_on=train; the served one when it is already), so its features look exactly as
      test events' do to the served model.
    holdout: the latest ranker.holdout_events of every user, scored by a shadow retrieval model
      trained without them (recsys.train.ranker_data.holdout_dataset).
    training: the served model's own training events (its scores there are over-confident).
    """
    tc, rc = cfg.train, cfg.ranker
    feature_dir = feature_model_dir(cfg, workdir)
    if rc.events == "validation":
        model = retrieval
        if feature_dir is not None:
            fresh = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, trained_on="train"))
            model = train_retrieval(fresh, ds, feature_dir, mesh, log=log, stage=SHADOW)
        return model, ds.eval_positions("val")
    if rc.events == "holdout":
        shadow_ds, train_pos, val_pos = holdout_dataset(ds, rc.holdout_events)
        shadow = train_retrieval(cfg, shadow_ds, feature_dir, mesh, log=log, stage=SHADOW)
        return shadow, np.union1d(train_pos, val_pos)
    positions = ds.train_positions(cfg.data.trained_on)
    wanted = min(len(positions), rc.steps * rc.batch_size)
    return retrieval, np.sort(np.random.default_rng(tc.seed).choice(positions, wanted, False))


def fit_ranker(cfg: Config, ds: Dataset, tables: RankerTables, events: Events,
               workdir: pathlib.Path, mesh, made_for: dict, log: MetricsLog | None = None,
               ) -> Trained:
    """Trains (or restores from workdir) a ranker on listwise batches of `events`.

    The number of steps is chosen by K-fold cross-validation over users (ranker.folds):
    K models train in lockstep, each on the events of the other folds, and the mean validation
    NDCG@10 of their held-out folds, every ranker.eval_every steps, picks the step count (with
    patience); then one model trains on every event for that many steps. `made_for`: the step
    counts of the retrieval models the inputs came from, saved with the ranker; a checkpoint
    made for other ones is stale and the ranker is trained again. Validation metrics and the
    final loss go to `log` (stage "ranker"; None: nowhere).
    """
    tc, rc = cfg.train, cfg.ranker
    sample = events.take(np.arange(min(len(events.positions), STATS_EVENTS)))
    stats = numeric_stats([batch_inputs(tables, sample, sample.candidates)])
    graphdef, state, shardings = state_lib.create(
        lambda rngs: build_model(cfg, ds, rngs, stats), make_optimizer(rc), tc.seed + 1, mesh)
    mngr = checkpoint.make_manager(workdir / "checkpoints" / "ranker", tc)
    expected = _checkpoint_meta(cfg, ds)
    with contextlib.closing(mngr):  # closed on errors too: no orbax threads left behind
        restored = checkpoint.restore_or_none(mngr, state_lib.abstract_state(state, shardings),
                                              expected, made_for)
        if restored:
            state, meta = restored
            out = {k: v for k, v in meta.items() if k.startswith("ranker/")}
        else:
            loss_fn = functools.partial(_ranker_loss_of, rc=rc)
            train_step = steps.make_train_step(graphdef, loss_fn, tc, shardings, mesh)
            fold_E = fold_of(events, rc.folds, tc.seed)
            if log is not None:
                log.begin("ranker", 0)
            out = _cross_validate(rc, tc.seed, ds.num_items, graphdef, state, train_step, tables,
                                  events, fold_E, mesh, log)
            retrieved = retrieved_only(events)
            with Progress("ranker fit", out["ranker/steps"]) as progress:
                state, loss = _train(rc, tc.seed, ds.num_items, train_step, _copy(state), tables,
                                     retrieved, out["ranker/steps"], mesh, fold=-1,
                                     progress=progress)
                progress.set_postfix(loss=f"{loss:.4f}")
            out.update({"ranker/final_loss": loss, "ranker/train_events": len(retrieved.positions)})
            if log is not None:
                log.write("ranker", out["ranker/steps"], {"train/final_loss": loss})
            with jax.set_mesh(mesh):
                checkpoint.save(mngr, out["ranker/steps"], state,
                                {**expected, **out, **made_for})
        checkpoint.wait(mngr)
        if log is not None:
            log.flush()
    return Trained(graphdef, state, out)


def _checkpoint_meta(cfg: Config, ds: Dataset) -> dict:
    """Metadata a ranker checkpoint must carry to restore into this model."""
    return checkpoint.as_json({
        **{f"ranker.{k}": getattr(cfg.ranker, k) for k in SHAPE_FIELDS},
        "model.out_dim": cfg.model.out_dim, "data.history_len": ds.history_len,
        **{f"vocab.{k}": v for k, v in dataclasses.asdict(vocabularies(ds)).items()}})


def fold_of(events: Events, folds: int, seed: int) -> np.ndarray:
    """[M] fold of each event: users are dealt into `folds` folds by a seeded permutation."""
    users = np.unique(events.users)
    fold_of_user = np.random.default_rng([seed, 7]).permutation(len(users)) % folds
    return fold_of_user[np.searchsorted(users, events.users)]


def _copy(state):
    return jax.tree.map(lambda x: x.copy(), state)


def _train(rc: RankerConfig, seed: int, num_items: int, train_step, state, tables,
           events: Events, num_steps: int, mesh, fold: int, first_step: int = 0,
           progress: Progress | None = None):
    """Steps first_step .. num_steps on listwise batches of `events` (seeded by fold and step);
    each step counts one on `progress`."""
    rows = sharding.process_rows(mesh, rc.batch_size)  # this process's rows of a batch
    loss = float("nan")
    with jax.set_mesh(mesh):
        for step in range(first_step, num_steps):
            rng = np.random.default_rng([seed, fold + 1, step])
            ev = events.take(rng.choice(len(events.positions), rc.batch_size))
            cand = listwise_rows(ev, rc.negatives, rc.random_negatives, rng, num_items)
            batch = batch_inputs(tables, ev, cand)
            state, loss_arr = train_step(state, sharding.shard_batch(
                {k: v[rows] for k, v in batch.items()}, mesh))
            if progress is not None:
                progress.update(1)
        if num_steps > first_step:
            loss = float(loss_arr)
    return state, loss


def _cross_validate(rc: RankerConfig, seed: int, num_items: int, graphdef, state0, train_step,
                    tables, events: Events, fold_E: np.ndarray, mesh,
                    log: MetricsLog | None = None) -> dict:
    """Trains one model per fold in lockstep; returns the chosen steps and validation metrics
    (each evaluation's also to `log`, stage "ranker")."""
    k = rc.folds
    every = rc.eval_every or rc.steps
    pools = [retrieved_only(events.take(np.flatnonzero(fold_E != f))) for f in range(k)]
    if any(len(p.positions) == 0 for p in pools):
        raise ConfigError(
            f"the ranker has too few events to learn from: of its {len(events.positions)} events "
            f"(ranker.events={rc.events}), {len(retrieved_only(events).positions)} have their "
            f"target in retrieval's top-{events.candidates.shape[1]}, fewer than one per fold "
            f"(ranker.folds={k}); train retrieval longer, or set ranker.steps=0 (retrieval order)")
    rng = np.random.default_rng([seed, 11])
    held = [events.take(np.sort(rng.permutation(np.flatnonzero(fold_E == f))[:CV_EVAL_EVENTS // k]))
            for f in range(k)]
    states = [_copy(state0) for _ in range(k)]
    # Counted in fold-steps: K models each take every step.
    with Progress(f"ranker cv ({k} folds)", k * rc.steps, unit="fold-steps") as progress:
        # Step 0 is the retrieval order itself (the correction starts at zero).
        curve = {0: _mean_val(graphdef, states, tables, held)}
        _log_val(log, 0, curve[0])
        best, bad, step = 0, 0, 0
        while step < rc.steps:
            nxt = min(step + every, rc.steps)
            states = [_train(rc, seed, num_items, train_step, s, tables, pool, nxt, mesh, f, step,
                             progress)[0]
                      for f, (s, pool) in enumerate(zip(states, pools))]
            step = nxt
            curve[step] = _mean_val(graphdef, states, tables, held)
            _log_val(log, step, curve[step])
            progress.set_postfix(val_ndcg=f"{curve[step]['ranker/val_ndcg@10']:.4f}")
            if curve[step]["ranker/val_ndcg@10"] > curve[best]["ranker/val_ndcg@10"]:
                best, bad = step, 0
            else:
                bad += 1
                if rc.patience and bad >= rc.patience:
                    break
    return {"ranker/steps": best, "ranker/cv_steps": step, **curve[best],
            "ranker/val_events": len(events.positions), "ranker/folds": k,
            "ranker/val_retrieval_ndcg@10": curve[0]["ranker/val_ndcg@10"]}


def _log_val(log: MetricsLog | None, step: int, val: dict) -> None:
    if log is not None:
        log.write("ranker", step, {"val/ndcg@10": val["ranker/val_ndcg@10"],
                                   "val/hr@10": val["ranker/val_hr@10"]})
        log.flush()


def _mean_val(graphdef, states, tables, held: list[Events]) -> dict:
    """Validation HR@10 / NDCG@10 over every held-out fold together (each by its own model)."""
    reranked, targets = [], []
    for s, ev in zip(states, held):
        if not len(ev.positions):  # fewer users than folds
            continue
        scores = score_events(steps.model_of(graphdef, s), tables, ev)
        reranked.append(np.take_along_axis(ev.candidates, np.argsort(-scores, 1, kind="stable"), 1))
        targets.append(ev.targets)
    reranked, targets = np.concatenate(reranked), np.concatenate(targets)
    return {"ranker/val_ndcg@10": metrics.ndcg_at_k(reranked, targets, 10),
            "ranker/val_hr@10": metrics.hit_rate_at_k(reranked, targets, 10)}


_score = layers.jitted("__call__")


def score_events(ranker, tables: RankerTables, ev: Events, block: int = EVAL_BLOCK) -> np.ndarray:
    """Ranker scores of every event's top-R candidates: [M, R] (-inf where a row is -1)."""
    out = []
    for lo in range(0, len(ev.positions), block):
        idx = np.arange(lo, lo + block) % len(ev.positions)  # pad the last block: one shape
        part = ev.take(idx)
        scores = sharding.to_host(_score(ranker, batch_inputs(tables, part, part.candidates)))
        out.append(scores[:min(block, len(ev.positions) - lo)])
    scores = np.concatenate(out)
    return np.where(ev.candidates > 0, scores, -np.inf)
