"""Training throughput: recsys against TensorFlow Recommenders on the same data and model.

    python -m benchmarks.throughput --json docs/throughput.json
    python -m benchmarks.report                   # renders docs/results.md "Training throughput"

The peer is optional and lives in its own venv (TensorFlow pins protobuf):
    python3 -m venv .venv-peer && .venv-peer/bin/pip install tensorflow-cpu \
        tensorflow-recommenders tf-keras                        # pyproject's `peer` extra
Without it (or with --peer-python naming an interpreter that cannot import TFRS) the TFRS
side is skipped with one line and `ratio_vs_tfrs` is null, with `tfrs_skipped` saying why.

The model is the TFRS retrieval tutorial's (benchmarks/peer_tfrs.py): user-id and item-id
embeddings of width 32, dot product, in-batch softmax, Adagrad 0.1, on ml-latest-small's
training events. recsys runs its closest config (RECSYS_LIKE_TFRS) through the public API:
recsys.config overrides, the Dataset recsys.pipeline builds, recsys.train.loop.train_retrieval.
Every run is a subprocess of its own (A/B pairs alternate, TFRS first), so runs never share
threads and load from other work falls on both sides alike.

Writes JSON with:
  ratio_vs_tfrs            {batch: median over pairs of recsys / TFRS examples/s} (null: no TFRS)
  ratio_per_cpu_s_vs_tfrs  the same for examples per CPU-second
  pairs                    {batch: [{tfrs: run, recsys: run}, ...]}; a run has examples_per_sec,
                           examples_per_cpu_s and the timed steps. recsys: examples_per_sec is
                           the loop's train/examples_per_sec (after the compiling call, input,
                           logging and the final checkpoint included); window_examples_per_sec
                           and examples_per_cpu_s cover only the timed steps (between two logged
                           steps), like TFRS's timed model.fit
  host_input_fraction      configs/movielens.py at batch 1024: train/host_input_seconds /
                           train/seconds from the loop's metrics (building batches; waits for
                           an unfinished mining refresh are not input and are counted apart:)
  mining_wait_fraction     the same run's train/mining_wait_seconds / train/seconds
  movielens_examples_per_sec_end_to_end  configs/movielens.py's own training, end to end
  devices                  recsys on 1, 2, 4, 8 fake CPU devices (XLA_FLAGS): step_examples_per_sec
                           (over the timed steps), examples_per_cpu_s, examples_per_sec_end_to_end
  table_rows               the same per train.embedding_optimizer at 1e4 and 1e7 synthetic item
                           rows, and what "auto" resolved to at each size
  load_avg                 os.getloadavg() before and after
  provenance               command, commit, recsys source hash
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import provenance

ROOT = provenance.ROOT
DATA = ROOT.parent / "shared" / "data" / "ml-latest-small"
PEER_VENV_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
MOVIELENS_CONFIG = ROOT / "configs" / "movielens.py"
# Default timed steps per run: this many examples (10 epochs of ml-latest-small), at least
# MIN_STEPS; long enough that fixed costs (the final checkpoint: about 0.14 s) are not what is
# measured at batch 1024, where a step takes about 4 ms.
EXAMPLES_PER_RUN = 1_000_000
MIN_STEPS = 20
TFRS_WARMUP_STEPS = 5  # steps fitted before timing (tracing and compilation)
DEVICE_COUNTS = (1, 2, 4, 8)
TABLE_ROWS = (10_000, 10_000_000)
EMBEDDING_OPTIMIZERS = ("dense", "rowwise_adagrad", "lazy_adam", "auto")
CHILD_TIMEOUT_S = 3600

# The TFRS tutorial model in recsys terms: a user-id and an item-id embedding of width 32 are the
# two vectors (no history, no output layer: model.history_pooling=none, model.output_layer=false).
# What still differs: recsys L2-normalises both vectors (temperature 1 here). data.history_len=1
# is the smallest the data allows; the model reads no history, so none is built or sent. TFRS's
# Adagrad is sparse; recsys's "dense" table update is the same arithmetic (untouched rows get a
# zero update). 4 steps per jitted call amortise dispatch (docs/distributed.md "Throughput");
# Keras's equivalent, steps_per_execution, did not speed TFRS up here, so it keeps the default.
RECSYS_LIKE_TFRS = (
    "model.embed_dim=32", "model.out_dim=32", "model.hidden_dims=()", "model.use_features=false",
    "model.time_features=false", "model.use_user_id=true", "model.temperature=1.0",
    "model.learn_temperature=false", "model.dropout=0.0", "model.history_pooling=none",
    "model.output_layer=false", "data.history_len=1",
    "train.optimizer=adagrad", "train.learning_rate=0.1", "train.embedding_optimizer=dense",
    "train.logq_correction=false", "train.remove_accidental_hits=false",
    "train.uniform_negatives=0", "train.hard_negatives=0", "train.mined_negatives=0",
    "train.eval_every=0", "train.checkpoint_every=0", "train.steps_per_call=4",
)


def say(message: str) -> None:
    print(f"throughput: {message}", file=sys.stderr, flush=True)


def default_steps(batch_size: int) -> int:
    return max(MIN_STEPS, EXAMPLES_PER_RUN // batch_size)


# Children -----------------------------------------------------------------------------------------

def _last_json(stdout: str) -> dict | None:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def run_recsys(spec: dict, devices: int = 1) -> dict:
    """One recsys measurement (`recsys_child`) in a fresh interpreter with `devices` CPU devices."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", TQDM_DISABLE="1")
    with tempfile.TemporaryDirectory(prefix="recsys-throughput-") as tmp:
        out = pathlib.Path(tmp) / "result.json"
        spec = {**spec, "out": str(out), "workdir": str(pathlib.Path(tmp) / "run")}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--child",
                               json.dumps(spec)], cwd=ROOT, env=env, timeout=CHILD_TIMEOUT_S,
                              check=False)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"recsys run failed (exit {proc.returncode}; its stderr is above): "
                               f"{spec['overrides']}")
        return json.loads(out.read_text())


def run_tfrs(peer_python: str, pairs: pathlib.Path, batch_size: int, steps: int) -> dict:
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([peer_python, "-m", "benchmarks.peer_tfrs", "--pairs", str(pairs),
                           "--batch-size", str(batch_size), "--steps", str(steps),
                           "--warmup-steps", str(TFRS_WARMUP_STEPS)],
                          cwd=ROOT, env=env, timeout=CHILD_TIMEOUT_S, check=False,
                          capture_output=True, text=True)
    result = _last_json(proc.stdout)
    ok = proc.returncode == 0 and result is not None and "error" not in result
    # TensorFlow's start-up chatter stays out of the progress lines (all of it on failure).
    print("\n".join(ln for ln in proc.stderr.splitlines() if not ok or ln.startswith("peer_tfrs:")),
          file=sys.stderr, flush=True)
    if not ok:
        raise RuntimeError(f"TFRS run failed (exit {proc.returncode}): "
                           f"{(result or {}).get('error', 'see its stderr above')}")
    return {**result, "load_avg_1m": os.getloadavg()[0]}


def probe_peer(peer_python: str) -> tuple[dict | None, str | None]:
    """(TF and TFRS versions, None) when `peer_python` imports TFRS, else (None, why not)."""
    if not pathlib.Path(peer_python).exists():
        return None, f"peer python {peer_python} does not exist"
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        proc = subprocess.run([peer_python, "-m", "benchmarks.peer_tfrs", "--probe"], cwd=ROOT,
                              env=env, timeout=300, check=False, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return None, f"{peer_python} took over 300 s to import TensorFlow Recommenders"
    result = _last_json(proc.stdout)
    if proc.returncode == 0 and result and "error" not in result:
        return result, None
    why = (result or {}).get("error") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"{peer_python}: {why}"


# The recsys child (runs in its own interpreter) ---------------------------------------------------

def recsys_child(spec: dict) -> dict:
    """Trains as spec says and returns the loop's metrics plus a timed window of steps.

    spec: config (a file, or null for recsys defaults), overrides, steps (timed steps: the run
    trains warm-up + steps with a loss logged at both ends of the window; null = the config's
    own num_steps, window between its first and last logged loss), workdir, out.
    """
    import jax

    from recsys import config as config_lib
    from recsys import sharding
    from recsys.metrics_log import MetricsLog
    from recsys.pipeline import load_data
    from recsys.train import sparse
    from recsys.train.loop import train_retrieval

    class StepTimes(MetricsLog):
        """A MetricsLog that also notes wall and CPU time whenever a training loss is written."""

        def __init__(self, workdir):
            super().__init__(workdir)
            self.marks: list[tuple[int, float, float]] = []  # (step, wall s, CPU s)

        def write(self, stage, step, scalars):
            if "train/loss" in scalars:
                self.marks.append((int(step), time.perf_counter(), time.process_time()))
            super().write(stage, step, scalars)

    base = config_lib.load(spec["config"]) if spec["config"] else config_lib.Config()
    cfg = config_lib.apply_overrides(base, spec["overrides"])
    if spec["steps"] is not None:  # warm-up: whole jitted calls, the first one compiling
        k = cfg.train.steps_per_call  # at least 2 calls, about a tenth of the timed steps
        warmup = k * max(2, math.ceil(spec["steps"] / (10 * k)))
        cfg = config_lib.apply_overrides(cfg, [f"train.num_steps={warmup + spec['steps']}",
                                               f"train.log_every={warmup}"])
    ds = load_data(cfg.data)
    mesh = sharding.make_mesh(cfg.mesh)
    workdir = pathlib.Path(spec["workdir"])
    with StepTimes(workdir) as log:
        trained = train_retrieval(cfg, ds, workdir, mesh, log=log)
    m = trained.metrics
    for key in ("train/examples_per_sec", "train/seconds", "train/host_input_seconds"):
        if key not in m:
            raise KeyError(f"recsys.train.loop.train_retrieval returned no {key!r}: {sorted(m)}")
    (s0, t0, c0), (s1, t1, c1) = log.marks[0], log.marks[-1]
    examples = (s1 - s0) * cfg.train.batch_size
    positions = ds.train_positions(cfg.data.trained_on, cfg.data.max_examples_per_user)
    return {"side": "recsys", "batch_size": cfg.train.batch_size, "devices": jax.device_count(),
            "num_items": ds.num_items, "train_examples": len(positions),
            "embedding_optimizer": cfg.train.embedding_optimizer,
            "table_update": _row_rule(trained, sparse),
            "steps": int(m["train/steps"]), "window_steps": s1 - s0,
            "examples_per_sec": m["train/examples_per_sec"],
            "device_examples_per_sec": m.get("train/device_examples_per_sec"),
            "seconds": m["train/seconds"], "host_input_seconds": m["train/host_input_seconds"],
            "input_wait_seconds": m.get("train/input_wait_seconds"),
            "mining_wait_seconds": m.get("train/mining_wait_seconds"),
            "window_examples_per_sec": examples / (t1 - t0) if t1 > t0 else None,
            "examples_per_cpu_s": examples / (c1 - c0) if c1 > c0 else None,
            "final_loss": m["train/final_loss"], "load_avg_1m": os.getloadavg()[0]}


def _row_rule(trained, sparse) -> str:
    """The table update the run used: "dense", or the sparse row optimizer's name."""
    from flax import nnx

    rule = nnx.merge(trained.graphdef, trained.state)[1].row_rule
    if rule is None:
        return "dense"
    return next(name for name, cls in sparse.ROW_OPTIMIZERS.items() if isinstance(rule, cls))


# Measurements -------------------------------------------------------------------------------------

def write_pairs(data: pathlib.Path, path: pathlib.Path) -> int:
    """The training events of recsys's Dataset (RECSYS_LIKE_TFRS) as raw (user, item) ids."""
    import numpy as np

    from recsys import config as config_lib
    from recsys.pipeline import load_data

    cfg = config_lib.apply_overrides(config_lib.Config(), [*data_overrides(data),
                                                           *RECSYS_LIKE_TFRS])
    ds = load_data(cfg.data)
    positions = ds.train_positions(cfg.data.trained_on, cfg.data.max_examples_per_user)
    np.savez(path, user=ds.users.raw(ds.seq_users[positions]),
             item=ds.items.raw(ds.seq_items[positions]))
    return len(positions)


def data_overrides(data: pathlib.Path) -> list[str]:
    return ["data.source=movielens", f"data.path={data}"]


def like_tfrs(overrides: list[str], batch_size: int, extra: list[str]) -> list[str]:
    return [*overrides, *RECSYS_LIKE_TFRS, f"train.batch_size={batch_size}", *extra]


def ab_pairs(args, peer: str | None, pairs_file: pathlib.Path) -> dict:
    """{batch: [{tfrs: run, recsys: run}, ...]}: alternating runs, TFRS first in each pair."""
    out = {}
    for b in args.batch_sizes:
        steps = args.steps or default_steps(b)
        out[str(b)] = []
        for i in range(args.pairs):
            pair = {}
            if peer:
                say(f"batch {b}, pair {i + 1}/{args.pairs}: TFRS, {steps} steps")
                pair["tfrs"] = run_tfrs(peer, pairs_file, b, steps)
            say(f"batch {b}, pair {i + 1}/{args.pairs}: recsys, {steps} steps")
            pair["recsys"] = run_recsys({"config": None, "steps": steps, "overrides": like_tfrs(
                data_overrides(args.data), b, args.recsys_set)})
            say("  " + ", ".join(f"{side} {r['examples_per_sec']:,.0f} ex/s" for side, r in
                                 pair.items()))
            out[str(b)].append(pair)
    return out


def median_ratios(pairs: dict, key: str) -> dict | None:
    """{batch: median over pairs of recsys[key] / tfrs[key]}, None without TFRS runs."""
    if not any("tfrs" in p for runs in pairs.values() for p in runs):
        return None
    return {b: statistics.median(p["recsys"][key] / p["tfrs"][key] for p in runs)
            for b, runs in pairs.items() if runs}


def device_scaling(args) -> dict:
    b = args.device_batch
    steps = args.steps or default_steps(b)
    runs = {}
    for n in DEVICE_COUNTS:
        say(f"devices: {n} fake CPU devices, batch {b}, {steps} steps")
        runs[str(n)] = run_recsys({"config": None, "steps": steps, "overrides": like_tfrs(
            data_overrides(args.data), b, args.recsys_set)}, devices=n)
    return {"batch_size": b, "steps": steps, "runs": runs, **_summary(runs)}


def table_rows(args) -> dict:
    """Each embedding optimizer at each synthetic catalogue size (1 device, batch rows_batch)."""
    b, steps = args.rows_batch, args.rows_steps
    runs: dict = {opt: {} for opt in EMBEDDING_OPTIMIZERS}
    for rows in args.table_rows:
        for opt in EMBEDDING_OPTIMIZERS:
            say(f"table rows: {rows:,} items, embedding_optimizer={opt}, batch {b}, {steps} steps")
            runs[opt][str(rows)] = run_recsys({"config": None, "steps": steps, "overrides": like_tfrs(
                ["data.source=synthetic", f"data.num_items={rows}"], b,
                [*args.recsys_set, f"train.embedding_optimizer={opt}"])})
    return {"batch_size": b, "steps": steps, "runs": runs,
            **{key: {opt: _summary(by)[key] for opt, by in runs.items()}
               for key in ("step_examples_per_sec", "examples_per_cpu_s",
                           "examples_per_sec_end_to_end")},
            "auto_resolves_to": {n: r["table_update"] for n, r in runs["auto"].items()}}


def _summary(runs: dict) -> dict:
    """Per run: examples/s over the timed steps (what a step costs), per CPU-second, and the
    loop's end-to-end figure (which also pays the final checkpoint: large for big tables)."""
    return {"step_examples_per_sec": {k: r["window_examples_per_sec"] for k, r in runs.items()},
            "examples_per_cpu_s": {k: r["examples_per_cpu_s"] for k, r in runs.items()},
            "examples_per_sec_end_to_end": {k: r["examples_per_sec"] for k, r in runs.items()}}


def movielens_runs(args) -> dict:
    """configs/movielens.py's own retrieval training (end to end), and at batch 1024."""
    out = {}
    extra = [f"train.num_steps={args.movielens_steps}"] if args.movielens_steps else []
    for name, batch in (("own", []), ("batch_1024", ["train.batch_size=1024"])):
        say(f"configs/movielens.py ({name}): {args.movielens_steps or 'its own'} steps")
        out[name] = run_recsys({"config": str(MOVIELENS_CONFIG), "steps": None, "overrides": [
            f"data.path={args.data}", *extra, *batch]})
    return out


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",")]  # float: 1e7 is accepted


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=pathlib.Path, help="write the results here too")
    p.add_argument("--data", type=pathlib.Path, default=DATA, help="ml-latest-small directory")
    p.add_argument("--peer-python", default=str(PEER_VENV_PYTHON if PEER_VENV_PYTHON.exists()
                                                  else sys.executable),
                   help="interpreter with TFRS (default: .venv-peer's if it exists)")
    p.add_argument("--batch-sizes", type=_ints, default=[1024, 8192])
    p.add_argument("--pairs", type=int, default=3, help="A/B pairs per batch size (0: none)")
    p.add_argument("--steps", type=int, default=0,
                   help=f"timed steps per run (0: {EXAMPLES_PER_RUN:,} examples, >= {MIN_STEPS})")
    p.add_argument("--device-batch", type=int, default=1024)
    p.add_argument("--rows-batch", type=int, default=1024)
    p.add_argument("--rows-steps", type=int, default=100,
                   help="timed steps of each table_rows run (dense at 1e7 rows: ~1 s a step)")
    p.add_argument("--table-rows", type=_ints, default=list(TABLE_ROWS),
                   help="synthetic item-table sizes of the table_rows runs")
    p.add_argument("--movielens-steps", type=int, default=0,
                   help="train.num_steps of the configs/movielens.py runs (0: the config's)")
    p.add_argument("--recsys-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for the recsys runs of the TFRS model (repeatable)")
    p.add_argument("--skip-devices", action="store_true")
    p.add_argument("--skip-rows", action="store_true")
    p.add_argument("--skip-movielens", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        pathlib.Path(spec["out"]).write_text(json.dumps(recsys_child(spec)))
        return {}

    t0, load_before = time.time(), os.getloadavg()
    out: dict = {"data": os.path.relpath(args.data, ROOT), "batch_sizes": args.batch_sizes}
    if not (args.data / "ratings.csv").is_file():
        reason = f"no MovieLens data at {args.data} (ratings.csv missing): nothing measured"
        say(f"skipped: {reason}")
        out.update(skipped=reason, provenance=provenance.record())
        provenance.emit(out, args.json)
        return out
    versions, why = probe_peer(args.peer_python)
    if why:
        say(f"TFRS side skipped: {why}")
    peer = None if why else args.peer_python
    out.update(tfrs=versions, tfrs_skipped=why, recsys_overrides=list(RECSYS_LIKE_TFRS),
               recsys_set=args.recsys_set)
    with tempfile.TemporaryDirectory(prefix="recsys-throughput-") as tmp:
        pairs_file = pathlib.Path(tmp) / "pairs.npz"
        out["train_examples"] = write_pairs(args.data, pairs_file)
        out["steps"] = {str(b): args.steps or default_steps(b) for b in args.batch_sizes}
        out["pairs"] = ab_pairs(args, peer, pairs_file)
    out["ratio_vs_tfrs"] = median_ratios(out["pairs"], "examples_per_sec")
    out["ratio_per_cpu_s_vs_tfrs"] = median_ratios(out["pairs"], "examples_per_cpu_s")
    out["ratio_window_vs_tfrs"] = median_ratios(out["pairs"], "window_examples_per_sec")
    out.update(host_input_fraction=None, movielens_examples_per_sec_end_to_end=None)
    if not args.skip_movielens:
        ml = movielens_runs(args)
        out["movielens_runs"] = ml
        out["movielens_examples_per_sec_end_to_end"] = ml["own"]["examples_per_sec"]
        b1024 = ml["batch_1024"]
        out["host_input_fraction"] = b1024["host_input_seconds"] / b1024["seconds"]
        out["mining_wait_fraction"] = b1024["mining_wait_seconds"] / b1024["seconds"]
    if not args.skip_devices:
        out["devices"] = device_scaling(args)
    if not args.skip_rows:
        out["table_rows"] = table_rows(args)
    out.update(load_avg={"before": list(load_before), "after": list(os.getloadavg())},
               wall_seconds=time.time() - t0, provenance=provenance.record())
    provenance.emit(out, args.json)
    return out


if __name__ == "__main__":
    main()
