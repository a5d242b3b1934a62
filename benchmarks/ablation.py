"""Retrieval ablation on MovieLens: baselines, the plain two-tower, then one addition per row.

    python -m benchmarks.ablation --data ../shared/data/ml-latest-small --seeds 0,1,2 \
        --json docs/ablation.json
    python -m benchmarks.report      # the table in docs/results.md, from docs/ablation.json

Each two-tower row is configs/movielens.py plus the row's overrides (cumulative: a row adds
its change to the kept rows above; then the CHANGES rows each change one thing of the final
config) with ranker.steps=0, trained as the config says and ranked
on the test split by the protocol's code; its `command` reproduces one seed with the CLI
(`recsys pipeline` prints the same retrieval/* metrics). Popularity and EASE (lambda tuned on
validation) come from benchmarks.baselines on the same split. With --json, finished runs are
kept and skipped on the next call, so the table can be filled in several sittings: a run is
known by its resolved configuration (the config file after the row's overrides and the seed)
and the hash of the recsys sources (benchmarks.provenance), so a changed config file or
changed code runs it again. Each run records both hashes, the commit and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import numpy as np

from benchmarks import baselines, provenance, report
from recsys import config as config_lib
from recsys import pipeline, sharding
from recsys.config import DataConfig, EvalConfig
from recsys.eval import protocol
from recsys.train.loop import train_retrieval

CONFIG = "configs/movielens.py"
METRICS = ("hr@10", "hr@50", "hr@100", "ndcg@10")
# The plain two-tower: mean-pooled history and user id, in-batch softmax without correction.
PLAIN = ["model.history_pooling=mean", "model.use_features=false", "model.time_features=false",
         "train.logq_correction=false", "train.uniform_negatives=0", "train.hard_negatives=0",
         "train.mined_negatives=0"]
# (row name, overrides, kept). A row adds its overrides to every kept row above it; a row that
# validation did not keep is shown but not carried on. The kept rows add up to
# configs/movielens.py (tests/test_movielens_config.py checks it).
ROWS = [
    ("plain two-tower (mean history, no logQ)", PLAIN, True),
    ("+ logQ correction", ["train.logq_correction=true"], True),
    ("+ mixed negatives (512 uniform, own correction)", ["train.uniform_negatives=512"], False),
    ("+ in-batch hard negatives (top 128)", ["train.hard_negatives=128"], True),
    ("+ index-mined hard negatives (8, ranks 10-100)", ["train.mined_negatives=8"], True),
    ("+ order-aware history (recency weights)", ["model.history_pooling=recency"], True),
    ("+ features (genres, year, time)", ["model.use_features=true", "model.time_features=true"],
     True),
]


# (row name, overrides) applied to configs/movielens.py itself: what each piece is worth at the
# end, where the cumulative rows above measure it at the point it was added.
CHANGES = [
    ("config without in-batch hard negatives", ["train.hard_negatives=0"]),
    ("config without mined negatives", ["train.mined_negatives=0"]),
    ("config with attention pooling (positions) instead of recency",
     ["model.history_pooling=attention"]),
    ("config without time features", ["model.time_features=false"]),
    ("config plus 512 uniform negatives", ["train.uniform_negatives=512"]),
]


def row_overrides(index: int) -> list[str]:
    """Overrides of row `index`: those of every kept row above it, then its own."""
    kept = [o for _, overrides, keep in ROWS[:index] if keep for o in overrides]
    return kept + ROWS[index][1]


def config_for(data: str, overrides: list[str], seed: int, config: str = CONFIG
               ) -> config_lib.Config:
    """The resolved config of one run: the config file, the data, no ranker, the seed, the row."""
    return config_lib.apply_overrides(config_lib.load(config), _sets(data, overrides, seed))


def _sets(data: str, overrides: list[str], seed: int) -> list[str]:
    return [f"data.path={data}", "ranker.steps=0", f"train.seed={seed}", *overrides]


def command(data: str, overrides: list[str], seed: int, config: str = CONFIG) -> str:
    sets = " ".join(f"--set {o}" for o in _sets(data, overrides, seed))
    return f"recsys pipeline --config {config} {sets} --workdir runs/ablation"


def two_tower_test(cfg: config_lib.Config) -> dict:
    """Test metrics of one two-tower run (what `command` prints as retrieval/*)."""
    ds = pipeline.load_data(cfg.data)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="ablation-") as tmp:
        trained = train_retrieval(cfg, ds, pathlib.Path(tmp), sharding.make_mesh(cfg.mesh))
        ev = protocol.evaluate_retrieval(trained.model(), ds, "test", cfg.eval)
    return {**{k: ev.metrics[k] for k in METRICS}, "steps": trained.metrics["train/steps"],
            "seconds": round(time.time() - t0, 1)}


def summarise(runs: list[dict]) -> dict:
    return {k: {"mean": float(np.mean([r[k] for r in runs])),
                "std": float(np.std([r[k] for r in runs]))} for k in METRICS}


def _baselines(data: str, previous: dict | None, source: str, lambdas) -> dict:
    """Popularity and EASE, reused from `previous` only for the same data and sources."""
    old = (previous or {}).get("baselines", {})
    if previous and previous.get("data") == data and old.get("source_sha256") == source:
        return old
    base = baselines.run(DataConfig(source="movielens", path=data), EvalConfig(), lambdas)
    return {**base, "source_sha256": source}


def _specs() -> list[tuple[str, str, list[str]]]:
    """(group, row name, overrides) of every two-tower row, in table order."""
    final = max(i for i, (_, _, keep) in enumerate(ROWS) if keep)
    specs = [("final" if i == final else "cumulative" if keep else "not kept",
              name if keep else f"{name} (not kept)", row_overrides(i))
             for i, (name, _, keep) in enumerate(ROWS)]
    return specs + [("change", name, row_overrides(final) + overrides)
                    for name, overrides in CHANGES]


def run(data: str, seeds: tuple[int, ...], previous: dict | None = None,
        only: set[int] | None = None, lambdas=baselines.LAMBDAS, log=print, save=None,
        config: str = CONFIG) -> dict:
    """Every row for every seed (reusing runs of `previous` with the same key); the JSON result.

    A run of `previous` is reused only when its resolved config and the recsys source hash
    both equal this run's (see benchmarks.provenance).
    save: called with the result so far after every finished row (None: only returned).
    """
    source, git = provenance.source_sha256(), provenance.git_state()
    done = {(r.get("config_sha256"), r.get("source_sha256")): r
            for row in (previous or {}).get("rows", []) for r in row.get("per_seed", {}).values()}
    base = _baselines(data, previous, source, lambdas)
    ease_cmd = f"python -m benchmarks.baselines --data {data}"
    rows = [{"name": "popularity", "group": "baseline", "runs": 1, "command": ease_cmd,
             "summary": {k: {"mean": base["popularity"]["test"][k], "std": 0.0}
                         for k in METRICS}},
            {"name": f"EASE (lambda {base['ease']['lambda']:g}, tuned on validation)",
             "group": "baseline", "runs": 1, "command": ease_cmd,
             "summary": {k: {"mean": base["ease"]["test"][k], "std": 0.0} for k in METRICS}}]
    result = {"data": data, "config": config, "seeds": list(seeds),
              "provenance": provenance.record(), "baselines": base, "rows": rows}
    for i, (group, name, overrides) in enumerate(_specs()):
        per_seed = {}
        for s in seeds:
            cfg = config_for(data, overrides, s, config)
            key = provenance.run_key(cfg, source)
            if (key["config_sha256"], key["source_sha256"]) in done:
                per_seed[str(s)] = done[key["config_sha256"], key["source_sha256"]]
            elif only is None or i in only:
                per_seed[str(s)] = {**two_tower_test(cfg), **key, "git": git,
                                    "load_average": list(os.getloadavg())}
                log(f"{name} seed {s}: " + " ".join(f"{k} {per_seed[str(s)][k]:.4f}"
                                                    for k in METRICS))
        if not per_seed:
            continue
        rows.append({"name": name, "group": group, "overrides": overrides,
                     "command": command(data, overrides, 0, config), "per_seed": per_seed,
                     "runs": len(per_seed), "summary": summarise(list(per_seed.values()))})
        if save is not None:
            save(result)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", help="comma-separated row numbers to run (0 = plain, then ROWS and "
                   "CHANGES in order; default all)")
    p.add_argument("--lambdas", default=",".join(str(x) for x in baselines.LAMBDAS))
    p.add_argument("--json", help="result file; runs already in it (same config and sources) "
                   "are not repeated")
    args = p.parse_args(argv)
    path = pathlib.Path(args.json) if args.json else None
    previous = json.loads(path.read_text()) if path and path.is_file() else None

    def save(result: dict) -> None:
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")

    result = run(args.data, tuple(int(s) for s in args.seeds.split(",")), previous,
                 {int(r) for r in args.rows.split(",")} if args.rows else None,
                 tuple(float(x) for x in args.lambdas.split(",")), save=save)
    save(result)
    print("\n" + report.ablation_table(result))


if __name__ == "__main__":
    main()
