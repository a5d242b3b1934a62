"""The text of `recsys --help` and of each command's --help: what it does, what it writes, and an
example."""

DESCRIPTION = """\
Train a two-tower retrieval model and a ranker, export them with a ScaNN index, and serve
recommendations through four stages (retrieve, filter, score, order).

A run lives in a workdir: config.json, checkpoints/, metrics.jsonl and tb/ (training curves),
metrics.json (test metrics), artifacts/ (what serving loads) and report/ (pictures)."""

EXAMPLES = """\
start here:
  recsys pipeline --config configs/quickstart.py --workdir runs/quickstart
  recsys serve --artifacts runs/quickstart/artifacts --user 42
  recsys report --workdir runs/quickstart

`recsys COMMAND --help` says what a command does, what it writes, and gives an example.
`--set section.field=value` overrides any config field; `recsys config` lists them all."""

# Each command's --help: what it does and writes, then an example (shown under "example:").
HELP = {
    "pipeline": ("""\
Run a whole experiment: train the retrieval model and the ranker, export the artifacts with a
fresh index, and evaluate every stage on the test split.

Writes into WORKDIR: config.json (the resolved config), checkpoints/, metrics.jsonl and tb/
(training curves), metrics.json (test metrics) and artifacts/ (what serving loads). Ends with a
summary and a sample recommendation.""",
                 "recsys pipeline --config configs/quickstart.py --workdir runs/quickstart"),
    "train": ("""\
Train the retrieval model, then the ranker, resuming from WORKDIR/checkpoints when a run was
interrupted.

Writes into WORKDIR: config.json, checkpoints/, metrics.jsonl and tb/ (training curves), and the
train/* and ranker/* keys of metrics.json. Prints those keys.""",
              "recsys train --config configs/tiny.py --workdir runs/tiny --set train.num_steps=20"),
    "export": ("""\
Export the models of a finished `recsys train` (never trains): towers, ranker, item vectors,
features and a ScaNN index.

Writes WORKDIR/artifacts/versions/<id>/ (under a temporary name, renamed when complete) and
switches WORKDIR/artifacts/current to it; old versions beyond export.keep_versions go.""",
               "recsys export --config configs/tiny.py --workdir runs/tiny"),
    "eval": ("""\
Evaluate the checkpoints, the published index and the served pipeline on the test split
(never trains).

Writes retrieval/*, index/recall@10, pipeline/* and ordering/* into WORKDIR/metrics.json and
prints a summary.""",
             "recsys eval --config configs/tiny.py --workdir runs/tiny"),
    "plan": ("""\
Print the memory plan of a config: bytes per device of the embedding tables, optimizer state,
activations and logits, and whether they fit. Plans for the config's mesh, even one larger
than this machine, and for the config's data, or for a catalogue size given by --num-items and
--num-users without reading any data. Writes nothing.""",
             ("recsys plan --config configs/quickstart.py --set mesh.data=4 --set mesh.model=2 "
              "--device-memory 16")),
    "index": ("""\
Rebuild the index of an artifacts directory with new index.* settings (the models are
unchanged).

Writes a new version beside the old one in ARTIFACTS/versions/ and switches `current` to it.
Prints the new index's recall@10 on item-neighbourhood queries.""",
              "recsys index --artifacts runs/quickstart/artifacts --set index.leaves_to_search=96"),
    "serve": ("""\
Print recommendations from an artifacts directory for a known user (--user) or a new one
given by a history of item ids (--history), with titles when known and the milliseconds of
each stage. Writes nothing.""",
              "recsys serve --artifacts runs/quickstart/artifacts --history 17,256,1024 --k 5"),
    "serve-http": ("""\
Serve recommendations over HTTP from an artifacts directory: POST /recommend and
/recommend_batch (JSON), GET /healthz and /metrics (Prometheus), POST /admin/reload.
Needs the http extra (pip install 'recsys[http]'). Writes nothing; logs to stderr.""",
                   "recsys serve-http --artifacts runs/quickstart/artifacts --port 8000"),
    "config": ("""\
Print the resolved config of a config file and its overrides: every field, one line each,
grouped by section, with its value, its default and what it means. Fields that differ from
the default are marked with *. Writes nothing.""",
               ("recsys config --config configs/movielens.py "
                "--set data.path=../shared/data/ml-latest-small")),
    "prepare": ("""\
Materialise the config's training examples once (each training event with its history, time
context, user and item features, in training order) so that training reads them a batch at a
time with Grain instead of building them in memory: `--set data.prepared=OUT` on recsys train.
With --beam, TFDS's Apache Beam pipeline writes them (DirectRunner here; Dataflow, Flink or
Spark through --beam-options; needs recsys[beam]).

Writes OUT/spec.json, OUT/tables.npz and OUT/recsys_examples/1.0.0/ (TFDS ArrayRecord shards),
under OUT.tmp renamed to OUT when complete. Prints the counts.""",
                "recsys prepare --config configs/quickstart.py --out runs/prepared/quickstart"),
    "report": ("""\
Draw pictures of a run as PNG files: training curves (from metrics.jsonl), HR@K of retrieval
and the pipeline against the popularity baseline, the index's recall@10 against queries per
CPU-second, and a per-stage latency histogram of the served artifacts. A picture whose inputs the
workdir lacks is skipped with a one-line reason. Needs matplotlib (pip install 'recsys[report]').

Writes WORKDIR/report/{curves,hr_at_k,index,latency}.png (or into --out).""",
               "recsys report --workdir runs/quickstart"),
}
