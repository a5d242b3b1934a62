"""The four-stage pipeline of one config over several seeds: one `recsys pipeline` run per seed.

    python -m benchmarks.pipeline_seeds --config configs/movielens.py \
        --data ../shared/data/ml-latest-small --seeds 0,1,2 --json docs/pipeline.json
    python -m benchmarks.report      # the Ranking tables of docs/results.md, from that JSON

Each seed runs `recsys pipeline --config CONFIG --set data.path=DATA --set train.seed=S
[--set ...] --workdir ROOT/seedS` as a subprocess: the exact command a reader repeats by hand.
A workdir is reused when its benchmark.json records a finished run of the same resolved config
and the same recsys sources (benchmarks.provenance); a workdir of another config or code, or an
unfinished one, is removed and run again from scratch, so no run resumes from a checkpoint of
something else. The JSON keeps per seed the workdir's metrics.json, the command, the resolved
config and its hash, the source hash, the commit, the load average before and after, and the
wall seconds; it is written again after every seed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

from benchmarks import provenance
from recsys import config as config_lib

MARKER = "benchmark.json"  # in each workdir: the run's key, then its whole record once finished


class SeedRunError(Exception):
    """A seed's run failed or its workdir cannot be used; the message names it."""


def pipeline_argv(config: str, overrides: list[str], workdir: pathlib.Path) -> list[str]:
    return ["recsys", "pipeline", "--config", config,
            *[a for o in overrides for a in ("--set", o)], "--workdir", str(workdir)]


def launch(argv: list[str]) -> int:
    """Runs a `recsys ...` command line with this interpreter; its exit status."""
    return subprocess.run([sys.executable, "-m", "recsys", *argv[1:]], check=False).returncode


def _reusable(workdir: pathlib.Path, key: dict) -> dict | None:
    """The finished record in `workdir` when it has this key; clears the workdir otherwise."""
    marker = workdir / MARKER
    if marker.is_file():
        old = json.loads(marker.read_text())
        if provenance.same_run(old, key) and "metrics" in old:
            return old
        shutil.rmtree(workdir)  # ours (it has the marker), but another run or an unfinished one
    elif workdir.exists() and any(workdir.iterdir()):
        raise SeedRunError(f"{workdir} exists and was not made by benchmarks.pipeline_seeds "
                           f"(no {MARKER}): remove it or pass another --workdir-root")
    return None


def run_seed(config: str, data: str, seed: int, root: pathlib.Path, *, sets=(), source: str,
             log=print) -> dict:
    """One seed's record: reused from its workdir when finished with the same key, else run."""
    overrides = [f"data.path={data}", f"train.seed={seed}", *sets]
    cfg = config_lib.apply_overrides(config_lib.load(config), overrides)
    key = provenance.run_key(cfg, source)
    workdir = root / f"seed{seed}"
    old = _reusable(workdir, key)
    if old is not None:
        log(f"seed {seed}: reusing the finished run in {workdir}")
        return old
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text(json.dumps(key, indent=2) + "\n")
    argv = pipeline_argv(config, overrides, workdir)
    record = {"seed": seed, "command": shlex.join(argv), "workdir": str(workdir), **key,
              "git": provenance.git_state(), "load_average_before": list(os.getloadavg()),
              "config": json.loads(provenance.canonical_config(cfg))}
    log(f"seed {seed}: {record['command']}")
    t0 = time.time()
    code = launch(argv)
    if code != 0:
        raise SeedRunError(f"seed {seed}: `{record['command']}` exited {code}")
    written = json.loads((workdir / "config.json").read_text())
    if json.dumps(written, sort_keys=True, separators=(",", ":")) != \
            provenance.canonical_config(cfg):
        raise SeedRunError(f"seed {seed}: {workdir}/config.json differs from the config this "
                           "runner resolved (its key would be wrong)")
    record.update({"seconds": round(time.time() - t0, 1),
                   "load_average_after": list(os.getloadavg()),
                   "metrics": json.loads((workdir / "metrics.json").read_text())})
    (workdir / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return record


def run(config: str, data: str, seeds: tuple[int, ...], root: pathlib.Path, *, sets=(),
        log=print, save=None) -> dict:
    """Every seed (reusing finished workdirs); `save` gets the result after each seed."""
    source = provenance.source_sha256()
    result = {"config": config, "data": data, "sets": list(sets), "seeds": list(seeds),
              "provenance": provenance.record(), "runs": {}}
    for seed in seeds:
        result["runs"][str(seed)] = run_seed(config, data, seed, root, sets=sets,
                                             source=source, log=log)
        if save is not None:
            save(result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, help="data.path of every run")
    p.add_argument("--seeds", default="0,1,2", help="train.seed values, comma-separated")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a further override for every seed (repeatable)")
    p.add_argument("--workdir-root", type=pathlib.Path, default=pathlib.Path("runs/pipeline"),
                   help="seed S runs in ROOT/seedS")
    p.add_argument("--json", type=pathlib.Path, required=True, help="where the result goes")
    args = p.parse_args(argv)

    def save(result: dict) -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")

    try:
        run(args.config, args.data, tuple(int(s) for s in args.seeds.split(",")),
            args.workdir_root, sets=args.set, save=save)
    except (SeedRunError, config_lib.ConfigError) as e:
        print(f"benchmarks.pipeline_seeds: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.json}; now run: python -m benchmarks.report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
