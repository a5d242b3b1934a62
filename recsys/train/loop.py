"""Retrieval training, top to bottom: data -> state -> restore-or-init -> jitted step -> loop."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import time

import jax

from recsys import config as config_lib
from recsys import sharding
from recsys.config import Config, EvalConfig
from recsys.data.batches import BatchOrder, example_inputs
from recsys.data.dataset import Dataset
from recsys.eval import protocol
from recsys.metrics_log import MetricsLog
from recsys.models.two_tower import TwoTower, Vocabularies
from recsys.progress import Progress
from recsys.train import checkpoint, mining, negatives, steps
from recsys.train import state as state_lib

CHECKPOINTS = pathlib.Path("checkpoints") / "retrieval"  # inside a workdir
# Model fields that decide parameter shapes: a checkpoint made with other values is refused.
SHAPE_FIELDS = ("embed_dim", "hidden_dims", "out_dim", "use_user_id", "use_features",
                "history_pooling", "time_features")


@dataclasses.dataclass
class Trained:
    graphdef: object
    state: object  # (model, optimizer) arrays
    metrics: dict  # train/* keys

    def model(self):
        return steps.model_of(self.graphdef, self.state)


def vocabularies(ds: Dataset) -> Vocabularies:
    return Vocabularies(num_users=ds.users.size, num_items=ds.items.size,
                        num_genres=ds.features.item_genres.shape[1],
                        user_cardinalities=ds.features.user_cardinalities,
                        history_len=ds.history_len)


def load_retrieval(cfg: Config, ds: Dataset, workdir: pathlib.Path,
                   mesh: jax.sharding.Mesh) -> Trained:
    """The two-tower model of workdir's finished training run, restored into sharded state.

    Never trains: a missing, incomplete (short of cfg.train.num_steps and not stopped early) or
    corrupt checkpoint raises checkpoint.CheckpointError.
    """
    vocab = vocabularies(ds)
    graphdef, abstract = state_lib.abstract(*_state_parts(cfg, vocab), cfg.train.seed, mesh)
    state, meta = checkpoint.load_trained(pathlib.Path(workdir) / CHECKPOINTS, abstract,
                                          _checkpoint_meta(cfg, vocab),
                                          num_steps=cfg.train.num_steps)
    metrics = {"train/steps": meta["step"], "train/final_loss": meta["loss"],
               "eval/trained_on": cfg.data.trained_on}
    if "best_step" in meta:
        metrics.update({"train/best_val_hr@10": meta["best_val_hr@10"],
                        "train/best_step": meta["best_step"]})
    return Trained(graphdef, state, metrics)


def _state_parts(cfg: Config, vocab: Vocabularies):
    """(build_model, optimizers): what state.create builds and state.abstract describes."""
    return (lambda rngs: TwoTower(cfg.model, vocab, rngs),
            state_lib.make_optimizer(cfg.train, logq_rows=vocab.num_items))


def _checkpoint_meta(cfg: Config, vocab: Vocabularies) -> dict:
    """Metadata a checkpoint must carry to restore into this model (table sizes, shape fields)."""
    return checkpoint.as_json({**{f"vocab.{k}": v for k, v in dataclasses.asdict(vocab).items()},
                               **{f"model.{k}": getattr(cfg.model, k) for k in SHAPE_FIELDS}})


def train_retrieval(cfg: Config, ds: Dataset, workdir: pathlib.Path, mesh: jax.sharding.Mesh, *,
                    log: MetricsLog | None = None, stage: str = "retrieval") -> Trained:
    """Trains the two-tower model for cfg.train.num_steps, resuming from workdir's checkpoints.

    Scalars go to `log` under `stage` (default: a MetricsLog of workdir, closed at the end);
    progress is reported as `stage`.
    """
    tc = cfg.train
    # Data: training targets and a batch order that is a pure function of (seed, step).
    positions = ds.train_positions(cfg.data.trained_on, cfg.data.max_examples_per_user)
    order = BatchOrder(positions, tc.batch_size, tc.seed)
    if tc.batch_size % jax.process_count():
        raise config_lib.ConfigError(f"train.batch_size={tc.batch_size} must divide evenly over "
                                     f"{jax.process_count()} processes")

    # Model and optimizer, born sharded on the mesh.
    vocab = vocabularies(ds)
    graphdef, state, shardings = state_lib.create(*_state_parts(cfg, vocab), tc.seed, mesh)

    # Resume order: (1) this workdir's latest verified checkpoint, (2) fresh init.
    mngr = checkpoint.make_manager(workdir / CHECKPOINTS, tc)
    with contextlib.ExitStack() as closing:  # closed on errors too: no orbax threads left behind
        closing.enter_context(contextlib.closing(mngr))
        if log is None:
            log = closing.enter_context(MetricsLog(workdir))
        expected = _checkpoint_meta(cfg, vocab)
        restored = checkpoint.restore_or_none(mngr, state_lib.abstract_state(state, shardings), expected)
        start, loss, meta = 0, float("nan"), {}
        if restored is not None:
            state, meta = restored
            start, loss = meta["step"], meta["loss"]
        # A run that stopped early is finished: resuming it must not train past its best state.
        stopped = bool(meta.get("early_stopped", False))

        train_step = steps.make_train_step(graphdef, steps.retrieval_loss, tc, shardings, mesh)
        rows = sharding.process_rows(mesh, tc.batch_size)  # this process reads only its rows

        # Negatives (recsys/train/negatives.py): in-batch ones with their log q, uniform ones
        # drawn from (seed, step), mined ones from a table that is re-mined every
        # train.mine_every_epochs and saved, so a resumed run reads the same.
        miner = (mining.MinedNegatives(ds, positions, tc, workdir / "checkpoints" / "mined")
                 if tc.mined_negatives else None)
        if miner is not None:
            miner.restore(steps.model_of(graphdef, state), start)
        sampler = negatives.Sampler(ds, positions, tc, mesh, miner)

        def batch_at(step):
            positions_B = order.at(step)[rows]
            batch = example_inputs(ds, positions_B)
            batch["negatives"] = sampler.at(step, positions_B, batch["item"])
            return sharding.shard_batch(batch, mesh)

        # Loop: step, log, evaluate on validation (early stopping), checkpoint.
        best = {"hr@10": -1.0, "step": start, "state": None, "bad_evals": 0}
        timed_examples, timed_seconds, step = 0, 0.0, start
        if start < tc.num_steps and not stopped:
            log.begin(stage, start + 1)  # what was logged up to the checkpoint's step stands
        progress = closing.enter_context(Progress(stage, tc.num_steps, initial=start))
        with jax.set_mesh(mesh):
            while step < tc.num_steps and not stopped:
                if miner is not None and miner.due(step):
                    miner.refresh(steps.model_of(graphdef, state), step)
                batch = batch_at(step)
                t0 = time.perf_counter()
                state, loss_arr = train_step(state, batch)
                step += 1
                progress.update(1)
                if step > start + 1:  # the first step compiles
                    loss_arr.block_until_ready()
                    timed_seconds += time.perf_counter() - t0
                    timed_examples += tc.batch_size
                if step % tc.log_every == 0 or step == tc.num_steps:
                    loss = float(loss_arr)
                    ex_s = timed_examples / max(timed_seconds, 1e-9)
                    progress.set_postfix(loss=f"{loss:.4f}", ex_s=f"{ex_s:.0f}")
                    log.write(stage, step, {"train/loss": loss, "train/examples_per_sec": ex_s,
                                            "train/learning_rate": tc.learning_rate})
                if tc.eval_every and (step % tc.eval_every == 0 or step == tc.num_steps):
                    stop, val = _evaluate_and_keep_best(cfg.eval, tc.early_stopping_patience, ds,
                                                        graphdef, state, step, best)
                    log.write(stage, step, {f"val/{k}": v for k, v in val.items()})
                    log.flush()
                    progress.set_postfix(val_hr10=f"{val['hr@10']:.4f}")
                    if stop:
                        progress.write(f"early stopping at step {step}: best validation hr@10 "
                                       f"{best['hr@10']:.4f} at step {best['step']}")
                        stopped = True
                        break
                if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.num_steps:
                    checkpoint.save(mngr, step, state, {**expected, "step": step, "loss": float(loss_arr)})
                    log.flush()
            if step > start:
                loss = float(loss_arr)
                validated = {}
                if best["state"] is not None:  # keep the best validated state
                    state = best["state"]
                    validated = {"best_val_hr@10": best["hr@10"], "best_step": best["step"]}
                checkpoint.save(mngr, step, state, {**expected, "step": step, "loss": loss,
                                                    "early_stopped": stopped, **validated})
            checkpoint.wait(mngr)
            log.flush()
    metrics = {"train/steps": step, "train/final_loss": loss,
               "train/examples_per_sec": timed_examples / timed_seconds if timed_seconds else 0.0,
               "eval/trained_on": cfg.data.trained_on}
    if best["state"] is not None:
        metrics["train/best_val_hr@10"] = best["hr@10"]
        metrics["train/best_step"] = best["step"]
    elif step == start and "best_step" in meta:  # nothing left to train: as the run reported
        metrics["train/best_val_hr@10"] = meta["best_val_hr@10"]
        metrics["train/best_step"] = meta["best_step"]
    return Trained(graphdef, state, metrics)


def _evaluate_and_keep_best(ec: EvalConfig, patience: int, ds: Dataset, graphdef, state,
                            step: int, best: dict) -> tuple[bool, dict]:
    """Validation metrics; keeps a copy of the best state (by HR@10). Returns (stop, metrics):
    stop is True when `patience` evaluations in a row brought no improvement (0 = never)."""
    result = protocol.evaluate_retrieval(steps.model_of(graphdef, state), ds, "val", ec)
    hr = result.metrics["hr@10"]
    if hr > best["hr@10"]:
        best.update({"hr@10": hr, "step": step, "bad_evals": 0,
                     "state": jax.tree.map(lambda x: x.copy(), state)})
        return False, result.metrics
    best["bad_evals"] += 1
    return patience > 0 and best["bad_evals"] >= patience, result.metrics
