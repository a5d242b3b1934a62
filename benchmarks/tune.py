"""Grid or random search over config knobs, scored on the validation split only (never on test).

    python -m benchmarks.tune --config configs/movielens.py \
        --set data.path=../shared/data/ml-latest-small \
        --grid train.uniform_negatives=0,1024 --grid model.history_pooling=recency,attention \
        --seeds 0,1 --json runs/tune.json

Every trial trains retrieval with data.trained_on=train (the validation event is held out) and
ranker.steps=0, keeps the best validated state when train.eval_every is set, and ranks the
validation events against the whole catalogue with the protocol's code. Prints a markdown table
of validation HR@10 / HR@50 / HR@100 / NDCG@10 (mean over seeds) and the chosen values (the best
mean validation HR@10; NDCG@10 breaks ties). Nothing is cached: every call trains every trial.
The JSON records each trial's resolved-config and recsys source hashes (benchmarks.provenance),
the commit and the load average, so a sweep kept under docs/ says what it measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import tempfile
import time

import numpy as np

from benchmarks import provenance
from recsys import config as config_lib
from recsys import pipeline, sharding
from recsys.eval import protocol
from recsys.train.loop import train_retrieval

METRICS = ("hr@10", "hr@50", "hr@100", "ndcg@10")
FORCED = ["data.trained_on=train", "ranker.steps=0"]  # tuning never sees the test split


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """["train.lr=0.1,0.3", ...] -> {"train.lr": ["0.1", "0.3"], ...} (values stay text)."""
    grid = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        # Tuple fields take comma lists themselves: separate their choices with '|'.
        choices = values.split("|") if "|" in values else values.split(",")
        if not sep or not key or not all(c.strip() for c in choices):
            raise config_lib.ConfigError(f"--grid {spec!r}: expected section.field=v1,v2,...")
        grid[key.strip()] = [c.strip() for c in choices]
    return grid


def trials(grid: dict[str, list[str]], random: int, seed: int) -> list[dict[str, str]]:
    """Every combination, or `random` of them drawn without replacement (seeded)."""
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    if 0 < random < len(combos):
        pick = np.random.default_rng(seed).choice(len(combos), random, replace=False)
        combos = [combos[i] for i in sorted(pick)]
    return combos


def validate_trial(cfg: config_lib.Config, workdir: pathlib.Path) -> dict:
    """Trains on train events and returns validation metrics of the kept state."""
    t0 = time.time()
    ds = pipeline.load_data(cfg.data)
    mesh = sharding.make_mesh(cfg.mesh)
    trained = train_retrieval(cfg, ds, workdir, mesh)
    ev = protocol.evaluate_retrieval(trained.model(), ds, "val", cfg.eval)
    return {**{k: ev.metrics[k] for k in METRICS}, "steps": trained.metrics["train/steps"],
            "best_step": trained.metrics.get("train/best_step", trained.metrics["train/steps"]),
            "seconds": round(time.time() - t0, 1)}


def run(base: config_lib.Config, sets: list[str], grid: dict, *, random: int = 0,
        seeds: tuple[int, ...] = (0,), search_seed: int = 0, log=print) -> dict:
    """Runs every trial for every seed; returns {"rows": [...], "chosen": {...}}."""
    rows, source = [], provenance.source_sha256()
    for combo in trials(grid, random, search_seed):
        per_seed = []
        for s in seeds:
            overrides = [*sets, *(f"{k}={v}" for k, v in combo.items()), f"train.seed={s}", *FORCED]
            cfg = config_lib.apply_overrides(base, overrides)
            with tempfile.TemporaryDirectory(prefix="tune-") as tmp:
                per_seed.append({**validate_trial(cfg, pathlib.Path(tmp)),
                                 **provenance.run_key(cfg, source)})
        row = {**combo, **{f"val/{k}": float(np.mean([r[k] for r in per_seed])) for k in METRICS},
               "val/hr@10_std": float(np.std([r["hr@10"] for r in per_seed])),
               "per_seed": per_seed,
               "best_step": [r["best_step"] for r in per_seed],
               "seconds": float(sum(r["seconds"] for r in per_seed))}
        rows.append(row)
        log(" ".join(f"{k}={v}" for k, v in combo.items()) + "  " + " ".join(
            f"{k} {row[f'val/{k}']:.4f}" for k in METRICS))
    chosen = max(rows, key=lambda r: (r["val/hr@10"], r["val/ndcg@10"])) if rows else {}
    return {"sets": sets, "grid": grid, "seeds": list(seeds), "rows": rows, "chosen": chosen,
            "provenance": provenance.record()}


def markdown(result: dict) -> str:
    """The trials as a markdown table, best validation HR@10 first."""
    keys = list(result["grid"])
    head = keys + [f"val {k}" for k in METRICS] + ["best step", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(result["rows"], key=lambda r: -r["val/hr@10"]):
        cells = [str(row[k]) for k in keys] + [f"{row[f'val/{k}']:.4f}" for k in METRICS]
        cells += [",".join(map(str, row["best_step"])), f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed override for every trial (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a knob and its values (repeatable; tuples: V1|V2)")
    p.add_argument("--random", type=int, default=0, help="sample this many combinations (0 = all)")
    p.add_argument("--seeds", default="0", help="train.seed values averaged per trial")
    p.add_argument("--search-seed", type=int, default=0)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    result = run(config_lib.load(args.config), args.set, parse_grid(args.grid),
                 random=args.random, seeds=tuple(int(s) for s in args.seeds.split(",")),
                 search_seed=args.search_seed)
    print("\n" + markdown(result))
    print("\nchosen: " + json.dumps({k: result["chosen"].get(k) for k in result["grid"]}))
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
