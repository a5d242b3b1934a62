"""Retrieval training, top to bottom: data -> state -> restore-or-init -> jitted step -> loop."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import time

import jax
import numpy as np

from recsys import config as config_lib
from recsys import sharding
from recsys.config import Config, EvalConfig
from recsys.data.batches import BatchOrder, example_inputs
from recsys.data.dataset import Dataset
from recsys.data.schema import DataError
from recsys.eval import protocol
from recsys.metrics_log import MetricsLog
from recsys.models.two_tower import TwoTower, Vocabularies, input_names
from recsys.progress import Progress
from recsys.train import checkpoint, mining, negatives, prefetch, steps
from recsys.train import state as state_lib

CHECKPOINTS = pathlib.Path("checkpoints") / "retrieval"  # inside a workdir
# Model fields that decide parameter shapes: a checkpoint made with other values is refused.
SHAPE_FIELDS = ("embed_dim", "hidden_dims", "out_dim", "use_user_id", "use_features",
                "history_pooling", "time_features", "output_layer")
# Shape fields added after checkpoints were first written, with the value older checkpoints
# were made with: recorded only when a run differs from it, so those checkpoints still restore.
LATER_SHAPE_FIELDS = {"output_layer": True}


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


def prepared_vocabularies(spec: dict) -> Vocabularies:
    """The table sizes of a `recsys prepare` directory's spec.json (equal to `vocabularies` of
    the Dataset it was prepared from)."""
    vocab = spec["vocab"]
    return Vocabularies(num_users=vocab["user_rows"], num_items=vocab["item_rows"],
                        num_genres=vocab["num_genres"],
                        user_cardinalities=tuple(vocab["user_cardinalities"]),
                        history_len=spec["history_len"])


def needs_events(cfg: Config) -> str:
    """Why retrieval training needs the event log in memory besides cfg.data.prepared's
    examples ("" when it does not): validation and mining read users' histories."""
    if not cfg.data.prepared:
        return "training without data.prepared"
    if cfg.train.eval_every:
        return f"validation (train.eval_every={cfg.train.eval_every})"
    if cfg.train.mined_negatives:
        return f"index-mined negatives (train.mined_negatives={cfg.train.mined_negatives})"
    return ""


def load_retrieval(cfg: Config, ds: Dataset, workdir: pathlib.Path,
                   mesh: jax.sharding.Mesh) -> Trained:
    """The two-tower model of workdir's finished training run, restored into sharded state.

    Never trains: a missing, incomplete (short of cfg.train.num_steps and not stopped early) or
    corrupt checkpoint raises checkpoint.CheckpointError.
    """
    vocab = vocabularies(ds)
    graphdef, abstract = state_lib.abstract(*state_parts(cfg, vocab), cfg.train.seed, mesh)
    state, meta = checkpoint.load_trained(pathlib.Path(workdir) / CHECKPOINTS, abstract,
                                          _checkpoint_meta(cfg, vocab),
                                          num_steps=cfg.train.num_steps)
    metrics = {"train/steps": meta["step"], "train/final_loss": meta["loss"],
               "eval/trained_on": cfg.data.trained_on}
    if "best_step" in meta:
        metrics.update({"train/best_val_hr@10": meta["best_val_hr@10"],
                        "train/best_step": meta["best_step"]})
    return Trained(graphdef, state, metrics)


def state_parts(cfg: Config, vocab: Vocabularies):
    """(build_model, optimizers): what state.create builds and state.abstract describes."""
    tc = cfg.train
    mined = tc.mined_negatives if tc.mined_vectors == "embed" else 0  # cached: not looked up
    history = vocab.history_len if cfg.model.reads_history else 0
    lookups = tc.batch_size * (1 + history + mined) + tc.uniform_negatives
    return (lambda rngs: TwoTower(cfg.model, vocab, rngs),
            state_lib.make_optimizer(tc, logq_rows=vocab.num_items, lookups_per_step=lookups))


def _checkpoint_meta(cfg: Config, vocab: Vocabularies) -> dict:
    """Metadata a checkpoint must carry to restore into this model (table sizes, shape fields)."""
    shape = {f"model.{k}": getattr(cfg.model, k) for k in SHAPE_FIELDS
             if k not in LATER_SHAPE_FIELDS or getattr(cfg.model, k) != LATER_SHAPE_FIELDS[k]}
    return checkpoint.as_json({**{f"vocab.{k}": v for k, v in dataclasses.asdict(vocab).items()},
                               **shape})


def train_retrieval(cfg: Config, ds: Dataset | None, workdir: pathlib.Path,
                    mesh: jax.sharding.Mesh, *, log: MetricsLog | None = None,
                    stage: str = "retrieval") -> Trained:
    """Trains the two-tower model for cfg.train.num_steps, resuming from workdir's checkpoints.

    Scalars go to `log` under `stage` (default: a MetricsLog of workdir, closed at the end);
    progress is reported as `stage`. `ds` may be None when the examples come from
    cfg.data.prepared and nothing else needs the event log (`needs_events`): the process
    then holds the prepared directory's tables and a batch reader, never the events.

    The host never waits for the device between steps: batches are built and placed on the
    mesh train.prefetch steps ahead on a background thread, train.steps_per_call steps run per
    jitted call, and a step's loss is read only after the next call is dispatched. The run
    stops at the steps where it must see the state (mining, validation, checkpoints), so what
    it computes is the same as one step at a time (with steps_per_call > 1, up to float32
    rounding inside the scan).
    """
    tc = cfg.train
    if tc.batch_size % jax.process_count():
        raise config_lib.ConfigError(f"train.batch_size={tc.batch_size} must divide evenly over "
                                     f"{jax.process_count()} processes")
    # Data: training targets in a batch order that is a pure function of (seed, step), built
    # here from the events, or read with Grain from `recsys prepare`'s shards (data.prepared).
    prepared = _open_prepared(cfg) if cfg.data.prepared else None
    if ds is None:
        why = needs_events(cfg)
        if why:
            raise config_lib.ConfigError(f"{why} needs the event log: train with the Dataset")
        positions, order = None, None
        num_examples, vocab = prepared.num_examples, prepared_vocabularies(prepared.spec)
        features, item_counts_V = prepared.features, prepared.item_counts
    else:
        positions = ds.train_positions(cfg.data.trained_on, cfg.data.max_examples_per_user)
        order = BatchOrder(positions, tc.batch_size, tc.seed, cfg.data.shuffle_window)
        num_examples, vocab = len(positions), vocabularies(ds)
        features, item_counts_V = ds.features, ds.item_counts(positions)
        if prepared is not None and prepared.num_examples != num_examples:
            raise DataError(f"{cfg.data.prepared} holds {prepared.num_examples} training "
                            f"examples, but the data gives {num_examples}; prepare it again "
                            "with this config")

    # Model and optimizer, born sharded on the mesh.
    graphdef, state, shardings = state_lib.create(*state_parts(cfg, vocab), tc.seed, mesh)

    # Resume order: (1) this workdir's latest verified checkpoint, (2) fresh init.
    mngr = checkpoint.make_manager(workdir / CHECKPOINTS, tc)
    with contextlib.ExitStack() as closing:  # closed on errors too: no threads left behind
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
        multi_step = (steps.make_multi_step(graphdef, steps.retrieval_loss, tc, shardings, mesh)
                      if tc.steps_per_call > 1 else None)
        rows = sharding.process_rows(mesh, tc.batch_size)  # this process reads only its rows

        # Negatives (recsys/train/negatives.py): in-batch ones with their log q, uniform ones
        # drawn from (seed, step), mined ones from a table that is re-mined every
        # train.mine_every_epochs and saved, so a resumed run reads the same.
        miner = (mining.MinedNegatives(ds, positions, tc, workdir / "checkpoints" / "mined")
                 if tc.mined_negatives else None)
        if miner is not None:  # closing: finishes and saves a begun refresh, joins its thread
            closing.enter_context(contextlib.closing(miner))
            miner.restore(steps.model_of(graphdef, state), start)
        sampler = negatives.Sampler(features, item_counts_V, tc, mesh, miner)

        # Examples: built here from the Dataset, or read with Grain from `recsys prepare`'s
        # ArrayRecord shards (data.prepared): the same examples in the same rows either way.
        reader = None
        if prepared is not None:  # this process's rows from step `start`
            reader = closing.enter_context(prepared.batches(
                tc.batch_size, tc.seed, rows=rows, start_step=start, num_steps=tc.num_steps,
                prefetch=max(tc.prefetch, 1)))
            if "input" in meta:  # refuses a checkpoint whose steps meant other batches
                reader.set_state(meta["input"])

        read_by_model = input_names(cfg.model, vocab)  # the rest is never sent to the device

        def host_batch(step):
            if reader is None:
                positions_B = order.at(step, rows=rows)
                inputs = example_inputs(ds, positions_B, read_by_model)
            else:
                read = next(reader)
                if read.step != step:
                    raise RuntimeError(f"the prepared-data reader is at step {read.step}, "
                                       f"the loop at {step}")
                positions_B, inputs = read.positions, read.inputs
            batch = {k: inputs[k] for k in read_by_model}
            batch["negatives"] = sampler.at(step, positions_B, batch["item"])
            return batch

        def meta_at(step):  # what a checkpoint at `step` records besides the model
            meta = {**expected, "step": step}
            return {**meta, "input": reader.state_at(step)} if reader is not None else meta

        def placed(call):  # call: (first step, steps) -> the call's batches on the mesh
            first, n = call
            if n == 1:
                return sharding.shard_batch(host_batch(first), mesh)
            stacked = jax.tree.map(lambda *xs: np.stack(xs), *map(host_batch, range(first, first + n)))
            return sharding.shard_batch(stacked, mesh, stacked=True)

        def segment_end(step):  # the next step at which the loop must see the state
            ends = [tc.num_steps]
            for every in (tc.eval_every, tc.checkpoint_every, miner.period if miner else 0):
                if every:
                    ends.append((step // every + 1) * every)
            return min(ends)

        # Loop: segments of jitted calls, then at the segment's end: log, validate (early
        # stopping), checkpoint, re-mine.
        best = {"hr@10": -1.0, "step": start, "state": None, "bad_evals": 0}
        clock = closing.enter_context(contextlib.closing(prefetch.StepClock()))
        timing = {"input": 0.0, "wait": 0.0, "compile": 0.0, "examples": 0, "t0": None}
        pending: list = []  # (step, losses of its call, index in them): logged one call behind

        def write_logs(upto: int) -> None:  # logs pending entries of calls before `upto`
            nonlocal loss
            while pending and pending[0][0] <= upto:
                s, losses, at = pending.pop(0)
                loss = float(losses[at] if losses.ndim else losses)
                ex_s = (timing["examples"] / (time.perf_counter() - timing["t0"])
                        if timing["t0"] else 0.0)
                progress.set_postfix(loss=f"{loss:.4f}", ex_s=f"{ex_s:.0f}")
                log.write(stage, s, {"train/loss": loss, "train/examples_per_sec": ex_s,
                                     "train/learning_rate": tc.learning_rate})

        step, last = start, None
        if start < tc.num_steps and not stopped:
            log.begin(stage, start + 1)  # what was logged up to the checkpoint's step stands
        progress = closing.enter_context(Progress(stage, tc.num_steps, initial=start))
        with jax.set_mesh(mesh):
            while step < tc.num_steps and not stopped:
                if miner is not None:  # when due: snapshot now, search on a thread, use later
                    miner.begin(step, steps.model_of(graphdef, state))
                calls = _calls(step, segment_end(step), tc.steps_per_call)
                with prefetch.Prefetcher(placed, calls, tc.prefetch) as batches:
                    for (first, n), batch in batches:
                        if n == 1:
                            state, last = train_step(state, batch)
                        else:
                            state, last = multi_step(state, batch)
                        clock.started(last, n)
                        write_logs(first)  # the previous call's losses: ready or nearly
                        step = first + n
                        progress.update(n)
                        pending.extend((s, last, s - first - 1 if n > 1 else ())
                                       for s in range(first + 1, step + 1)
                                       if s % tc.log_every == 0 or s == tc.num_steps)
                        if timing["t0"] is None:  # the first call compiles: timed apart
                            last.block_until_ready()
                            timing["t0"] = time.perf_counter()
                        else:
                            timing["examples"] += n * tc.batch_size
                    timing["input"] += batches.build_seconds
                    timing["wait"] += batches.wait_seconds
                write_logs(step)
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
                    if miner is not None:  # a table begun before this checkpoint is on disk first
                        miner.flush()
                    checkpoint.save(mngr, step, state, {**meta_at(step), "loss": _last_loss(last)})
                    log.flush()
            if step > start:
                loss = _last_loss(last)
                validated = {}
                if best["state"] is not None:  # keep the best validated state
                    state = best["state"]
                    validated = {"best_val_hr@10": best["hr@10"], "best_step": best["step"]}
                if miner is not None:
                    miner.flush()
                checkpoint.save(mngr, step, state, {**meta_at(step), "loss": loss,
                                                    "early_stopped": stopped, **validated})
            checkpoint.wait(mngr)
            log.flush()
        seconds = time.perf_counter() - timing["t0"] if timing["t0"] else 0.0
        mining_wait = miner.wait_seconds if miner is not None else 0.0
    metrics = {"train/steps": step, "train/final_loss": loss,
               # End to end: every second after the first (compiling) call, input, logging,
               # validation and checkpoints included.
               "train/examples_per_sec": timing["examples"] / seconds if seconds else 0.0,
               "train/device_examples_per_sec": (clock.steps * tc.batch_size / clock.busy_seconds
                                                 if clock.busy_seconds else 0.0),
               "train/seconds": seconds,
               # Building batches on the host; waits for an unfinished mining refresh (inside
               # a batch's build, not input work) are counted apart.
               "train/host_input_seconds": timing["input"] - mining_wait,
               "train/mining_wait_seconds": mining_wait,
               "train/input_wait_seconds": timing["wait"],
               "eval/trained_on": cfg.data.trained_on}
    if best["state"] is not None:
        metrics["train/best_val_hr@10"] = best["hr@10"]
        metrics["train/best_step"] = best["step"]
    elif step == start and "best_step" in meta:  # nothing left to train: as the run reported
        metrics["train/best_val_hr@10"] = meta["best_val_hr@10"]
        metrics["train/best_step"] = meta["best_step"]
    return Trained(graphdef, state, metrics)


def _open_prepared(cfg: Config):
    """cfg.data.prepared, opened: it must have been prepared from these data fields (else
    DataError naming the field)."""
    from recsys.data.grain_input import PreparedData  # Grain and TFDS only when asked for

    return PreparedData.open(cfg.data.prepared, expect=cfg.data)


def _calls(start: int, end: int, k: int) -> list[tuple[int, int]]:
    """(first step, steps) of the jitted calls from `start` to `end`: k steps per call, single
    steps for the remainder (two compiled shapes only)."""
    calls, step = [], start
    while step < end:
        n = k if step + k <= end else 1
        calls.append((step, n))
        step += n
    return calls


def _last_loss(losses) -> float:
    """The loss of the last step of a call's output (a scalar, or [k] for k steps)."""
    return float(losses[-1] if losses.ndim else losses)


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
