"""`recsys` command line: parses arguments and calls the pipeline; user errors exit 2 with one line."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

USER_ERRORS: tuple[type[BaseException], ...] = ()  # filled in main() after the heavy imports


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsys", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("--config", required=True, help="Python file with get_config()")
        s.add_argument("--workdir", required=True, help="where checkpoints, metrics and artifacts go")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.num_steps=20 (repeatable)")
        return s

    with_config("pipeline", "train -> export -> index -> rank -> evaluate, end to end")
    with_config("train", "train retrieval and ranker (resumes from the workdir's checkpoints)")
    with_config("export", "write WORKDIR/artifacts (towers, ranker, features, index) from checkpoints")
    with_config("eval", "evaluate checkpoints and artifacts on the test split; writes metrics.json")
    plan = sub.add_parser("plan", help="print the memory plan: bytes per device, and whether it fits")
    plan.add_argument("--config", required=True, help="Python file with get_config()")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--device-memory", type=float, metavar="GIB",
                      help="memory of one device (default: what the device reports)")
    idx = sub.add_parser("index", help="rebuild the index of an artifacts directory")
    idx.add_argument("--artifacts", required=True)
    idx.add_argument("--set", action="append", default=[], metavar="index.KEY=VALUE")
    serve = sub.add_parser("serve", help="print recommendations from an artifacts directory")
    serve.add_argument("--artifacts", required=True)
    serve.add_argument("--user", help="raw user id")
    serve.add_argument("--history", help="comma-separated raw item ids (a new user)")
    serve.add_argument("--exclude", help="comma-separated raw item ids never to recommend")
    serve.add_argument("--k", type=int, default=10)
    serve.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    global USER_ERRORS
    from recsys.artifacts import ArtifactError
    from recsys.config import ConfigError
    from recsys.data.schema import DataError
    from recsys.index import IndexLoadError
    from recsys.serve import RequestError
    from recsys.train.checkpoint import CheckpointError
    USER_ERRORS = (ConfigError, DataError, CheckpointError, ArtifactError, IndexLoadError,
                   RequestError, FileNotFoundError)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        print(f"recsys {args.command}: error: {e}", file=sys.stderr)
        return 2


def _config(args):
    from recsys import config as config_lib
    from recsys import sharding
    sharding.maybe_initialize_distributed()
    return config_lib.apply_overrides(config_lib.load(args.config), args.set)


def _workdir(args) -> pathlib.Path:
    """--workdir as a path; refused in one line when it, or one above it, is not a directory."""
    from recsys.config import ConfigError
    workdir = pathlib.Path(args.workdir)
    for path in (workdir, *workdir.parents):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--workdir {workdir}: {path} exists and is not a directory")
    return workdir


def cmd_pipeline(args) -> int:
    from recsys import pipeline
    workdir = _workdir(args)
    metrics = pipeline.run(_config(args), workdir)
    _summary(metrics, workdir)
    return 0


def cmd_train(args) -> int:
    from recsys import pipeline
    workdir = _workdir(args)
    metrics = pipeline.train(_config(args), workdir)
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith(("train/", "ranker/"))},
                     indent=2))
    return 0


def cmd_export(args) -> int:
    from recsys import pipeline
    workdir = _workdir(args)
    out = pipeline.export(_config(args), workdir)
    import jax
    if jax.process_index() == 0:  # the one that wrote them
        print(f"artifacts written to {out}")
    return 0


def cmd_eval(args) -> int:
    from recsys import pipeline
    workdir = _workdir(args)
    metrics = pipeline.evaluate(_config(args), workdir)
    _summary(metrics, workdir)
    return 0


def cmd_plan(args) -> int:
    from recsys import pipeline, plan
    if args.device_memory is not None:
        args.set = [*args.set, f"mesh.device_memory_gib={args.device_memory}"]
    cfg = _config(args)
    mesh = plan.planning_mesh(cfg.mesh)  # may be larger than this machine
    print(plan.format_plan(plan.for_dataset(cfg, pipeline.load_data(cfg.data), mesh)))
    return 0


def cmd_index(args) -> int:
    from recsys import pipeline
    result = pipeline.rebuild_index(pathlib.Path(args.artifacts), args.set)
    print(json.dumps(result, indent=2))
    return 0


def cmd_serve(args) -> int:
    from recsys.serve import Recommender
    if args.user is None and args.history is None:
        print("recsys serve: error: give --user ID and/or --history ID,ID,...", file=sys.stderr)
        return 2
    rec = Recommender.load(args.artifacts)
    split = (lambda s: [x.strip() for x in s.split(",") if x.strip()])
    out = rec.recommend(user_id=args.user, k=args.k,
                        history=split(args.history) if args.history is not None else None,
                        exclude=split(args.exclude) if args.exclude else None)
    if args.json:
        print(json.dumps({"items": out.items, "scores": out.scores, "titles": out.titles,
                          "timings_ms": out.timings, "unknown_ids": out.unknown_ids,
                          "cold_start": out.cold_start}, indent=2, default=str))
        return 0
    _print_recommendation(out)
    return 0


def _print_recommendation(out) -> None:
    if out.unknown_ids:
        # repr: an id such as " 3 " is unknown because of its spaces, which str() would hide
        print(f"unknown ids (ignored): {', '.join(map(repr, out.unknown_ids))}")
    if out.cold_start:
        print("cold start: no known user or history, serving popular items")
    for i, (item, score) in enumerate(zip(out.items, out.scores)):
        title = f"  {out.titles[i]}" if out.titles else ""
        print(f"{i + 1:3d}. {item!s:>8}  {score:8.4f}{title}")
    print("timings (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in out.timings.items()))


def _summary(metrics: dict, workdir: pathlib.Path) -> None:
    import jax
    if jax.process_index() != 0:
        return
    keys = ["dataset", "num_users", "num_items", "train/steps", "train/final_loss",
            "train/examples_per_sec", "retrieval/hr@10", "retrieval/hr@100", "retrieval/ndcg@10",
            "index/recall@10", "pipeline/hr@10", "pipeline/ndcg@10", "wall_seconds"]
    print("\nsummary")
    for k in keys:
        if k in metrics:
            v = metrics[k]
            print(f"  {k:24s} {v:.4f}" if isinstance(v, float) else f"  {k:24s} {v}")
    print(f"  metrics: {workdir / 'metrics.json'}  artifacts: {workdir / 'artifacts'}")
    artifacts = workdir / "artifacts"
    if artifacts.is_dir():  # a bundle root (recsys.artifacts): Recommender.load finds its version
        from recsys.artifacts import ArtifactError
        from recsys.serve import Recommender
        try:
            rec = Recommender.load(artifacts)
        except ArtifactError as e:  # the metrics stand; only the sample is missing
            print(f"\nno sample recommendation: {e}")
            return
        user = rec.artifacts.users.ids[0].item()
        print(f"\nsample: recsys serve --artifacts {artifacts} --user {user}")
        _print_recommendation(rec.recommend(user_id=user, k=5))


COMMANDS = {"pipeline": cmd_pipeline, "train": cmd_train, "export": cmd_export, "eval": cmd_eval,
            "plan": cmd_plan, "index": cmd_index, "serve": cmd_serve}

if __name__ == "__main__":
    sys.exit(main())
