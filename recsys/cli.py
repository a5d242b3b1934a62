"""`recsys` command line: parses arguments and calls the pipeline; user errors exit 2 with one line."""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

from recsys.cli_help import DESCRIPTION, EXAMPLES, HELP

USER_ERRORS: tuple[type[BaseException], ...] = ()  # filled in main() after the heavy imports


def _parser() -> argparse.ArgumentParser:
    from recsys.artifacts import recsys_version
    p = argparse.ArgumentParser(prog="recsys", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"recsys {recsys_version()}")
    sub = p.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("--config", required=True, help="Python file with get_config()")
        s.add_argument("--workdir", required=True, help="where checkpoints, metrics and artifacts go")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.num_steps=20 (repeatable)")
        return s

    with_config("pipeline", "a whole run: train both models, export the artifacts, evaluate")
    with_config("train", "train retrieval and ranker (resumes from the workdir's checkpoints)")
    with_config("export", "write WORKDIR/artifacts (towers, ranker, features, index) from checkpoints")
    with_config("eval", "evaluate checkpoints and artifacts on the test split; writes metrics.json")
    plan = sub.add_parser("plan", help="print the memory plan: bytes per device, and whether it fits")
    plan.add_argument("--config", required=True, help="Python file with get_config()")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set mesh.data=4 (repeatable)")
    plan.add_argument("--device-memory", type=float, metavar="GIB",
                      help="memory of one device (default: what the device reports)")
    plan.add_argument("--num-items", type=int, metavar="N",
                      help="plan for N items (with --num-users) instead of the config's data")
    plan.add_argument("--num-users", type=int, metavar="U", help="users, with --num-items")
    prep = sub.add_parser("prepare", help="write the training examples as ArrayRecord shards (Grain)")
    prep.add_argument("--config", required=True, help="Python file with get_config()")
    prep.add_argument("--out", required=True,
                      help="directory to write (an existing one must be empty or prepared)")
    prep.add_argument("--beam", action="store_true",
                      help="write with TFDS's Apache Beam pipeline (needs recsys[beam])")
    prep.add_argument("--beam-options", default="", metavar="FLAGS",
                      help="Beam pipeline options with --beam, e.g. '--runner=DataflowRunner "
                           "--project=P --region=R --temp_location=gs://B/tmp' (default: "
                           "--runner=DirectRunner)")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set data.num_users=100000 (repeatable)")
    idx = sub.add_parser("index", help="rebuild the index of an artifacts directory")
    idx.add_argument("--artifacts", required=True, help="artifacts root (WORKDIR/artifacts)")
    idx.add_argument("--set", action="append", default=[], metavar="index.KEY=VALUE",
                     help="index setting, e.g. --set index.kind=exact (repeatable)")
    serve = sub.add_parser("serve", help="print recommendations from an artifacts directory")
    serve.add_argument("--artifacts", required=True, help="artifacts root (WORKDIR/artifacts)")
    serve.add_argument("--user", help="raw user id")
    serve.add_argument("--history", help="comma-separated raw item ids (a new user)")
    serve.add_argument("--exclude", help="comma-separated raw item ids never to recommend")
    serve.add_argument("--k", type=int, default=10, help="items to recommend (> 0; default 10)")
    serve.add_argument("--json", action="store_true", help="print the result as JSON")
    http = sub.add_parser("serve-http", help="serve recommendations over HTTP (needs recsys[http])")
    http.add_argument("--artifacts", required=True, help="artifacts root (or a version of one)")
    http.add_argument("--port", type=int, required=True, help="TCP port (0: any free one)")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on")
    http.add_argument("--watch", type=float, metavar="SECONDS",
                      help="reload when the root's `current` changes, polled every SECONDS")
    cfg = sub.add_parser("config", help="print the resolved config: values, defaults, comments")
    cfg.add_argument("--config", required=True, help="Python file with get_config()")
    cfg.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set train.num_steps=20 (repeatable)")
    report = sub.add_parser("report", help="draw PNG pictures of a run (needs recsys[report])")
    report.add_argument("--workdir", required=True, help="the run's workdir")
    report.add_argument("--out", help="directory for the pictures (default: WORKDIR/report)")
    report.add_argument("--requests", type=int, default=300, metavar="N",
                        help="recommend calls timed for the latency picture (default 300)")
    for name, s in sub.choices.items():  # tests/test_cli_help.py checks every command has one
        if name in HELP:
            s.formatter_class = argparse.RawDescriptionHelpFormatter
            s.description, example = HELP[name]
            s.epilog = f"example:\n  {example}"
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:  # unless the caller configured logging: recsys's INFO
        # lines (progress when stderr is not a terminal), other libraries' warnings (orbax and
        # absl say much at INFO)
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s",
                            datefmt="%H:%M:%S")
        logging.getLogger("recsys").setLevel(logging.INFO)
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
    if (args.num_items is None) != (args.num_users is None):
        print("recsys plan: error: give both --num-items and --num-users, or neither",
              file=sys.stderr)
        return 2
    if args.num_items is not None:
        if args.num_items < 1 or args.num_users < 1:
            print("recsys plan: error: --num-items and --num-users must be positive",
                  file=sys.stderr)
            return 2
        print(plan.format_plan(plan.for_sizes(cfg, args.num_users, args.num_items, mesh)))
        return 0
    print(plan.format_plan(plan.for_dataset(cfg, pipeline.load_data(cfg.data), mesh)))
    return 0


def cmd_prepare(args) -> int:
    import shlex

    from recsys import config as config_lib
    from recsys.data import prepare
    if args.beam_options and not args.beam:
        print("recsys prepare: error: --beam-options needs --beam", file=sys.stderr)
        return 2
    beam_options = None
    if args.beam:
        try:
            import apache_beam  # noqa: F401
        except ImportError:
            print("recsys prepare: error: --beam needs Apache Beam: pip install 'recsys[beam]'",
                  file=sys.stderr)
            return 2
        beam_options = shlex.split(args.beam_options) or ["--runner=DirectRunner"]
    cfg = config_lib.apply_overrides(config_lib.load(args.config), args.set)
    out = prepare.prepare(cfg.data, args.out, beam_options=beam_options)
    spec = json.loads((out / prepare.SPEC).read_text())
    print(f"{spec['num_examples']} training examples of {spec['dataset']} ({spec['num_events']} "
          f"events, {spec['num_users']} users, {spec['num_items']} items) written to {out}")
    print(f"train from them with --set data.prepared={out}")
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
    if args.k <= 0:
        print(f"recsys serve: error: --k {args.k}: must be a positive number of items",
              file=sys.stderr)
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


def cmd_serve_http(args) -> int:
    try:
        from recsys.serve import http
    except ImportError as e:
        if "recsys[http]" not in str(e):
            raise
        print(f"recsys serve-http: error: {e}", file=sys.stderr)
        return 2
    http.serve(args.artifacts, args.host, args.port, watch=args.watch)
    return 0


def cmd_config(args) -> int:
    from recsys import config as config_lib
    cfg = config_lib.apply_overrides(config_lib.load(args.config), args.set)
    print(config_lib.listing(cfg, args.config))
    return 0


def cmd_report(args) -> int:
    from recsys import report
    if args.requests <= 0:
        print(f"recsys report: error: --requests {args.requests}: must be positive", file=sys.stderr)
        return 2
    try:
        result = report.render(_workdir(args), args.out, requests=args.requests)
    except report.ReportError as e:
        print(f"recsys report: error: {e}", file=sys.stderr)
        return 2
    for path in result.written.values():
        print(f"wrote {path}")
    for name, why in result.skipped.items():
        print(f"skipped {name}: {why}")
    for note in result.notes:
        print(f"note: {note}")
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
            "plan": cmd_plan, "prepare": cmd_prepare, "index": cmd_index, "serve": cmd_serve,
            "serve-http": cmd_serve_http, "config": cmd_config, "report": cmd_report}

if __name__ == "__main__":
    sys.exit(main())
