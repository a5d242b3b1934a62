"""The TensorFlow Recommenders side of benchmarks.throughput: the tutorial-style two-tower model.

    .venv-peer/bin/python -m benchmarks.peer_tfrs --probe
    .venv-peer/bin/python -m benchmarks.peer_tfrs --pairs PAIRS.npz --batch-size 1024 --steps 300

Runs in its own interpreter (the `peer` venv: TensorFlow pins protobuf, so it never shares the
recsys venv) and imports neither recsys nor jax. The model is the TFRS retrieval tutorial's:
user-id and movie-id lookups into width-32 embeddings, dot product, in-batch softmax through
`tfrs.tasks.Retrieval` without metrics, trained by `model.fit` with Adagrad. The last stdout
line is one JSON object; progress goes to stderr. `--probe` only imports TF and TFRS and prints
their versions (exit 1 with a one-line reason when they cannot be imported).
"""

from __future__ import annotations

import os
import sys

# Run as a file, its folder would come first on sys.path, and benchmarks/http.py would hide the
# standard library's http (which TensorFlow imports).
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # TFRS needs Keras 2 (tf_keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import time


def log(message: str) -> None:
    print(f"peer_tfrs: {message}", file=sys.stderr, flush=True)


def import_tfrs():
    """(tf, tfrs), or SystemExit(1) after printing one line naming what is missing."""
    try:
        import tensorflow as tf
        import tensorflow_recommenders as tfrs
    except Exception as e:  # noqa: BLE001 (any import failure means: no peer here)
        print(json.dumps({"error": f"cannot import TensorFlow Recommenders: "
                                   f"{type(e).__name__}: {e}".splitlines()[0]}))
        raise SystemExit(1) from None
    return tf, tfrs


def build_model(tf, tfrs, user_ids, item_ids, dim: int):
    """Query tower: user id -> IntegerLookup -> Embedding(dim); candidate tower: the same for
    items; the loss is tfrs.tasks.Retrieval (in-batch softmax, no metrics, no temperature)."""

    def tower(vocabulary):
        lookup = tf.keras.layers.IntegerLookup(vocabulary=vocabulary)
        return tf.keras.Sequential([lookup, tf.keras.layers.Embedding(
            lookup.vocabulary_size(), dim)])

    class TwoTower(tfrs.Model):
        def __init__(self):
            super().__init__()
            self.query_tower = tower(user_ids)
            self.candidate_tower = tower(item_ids)
            self.task = tfrs.tasks.Retrieval()

        def compute_loss(self, features, training=False):
            return self.task(self.query_tower(features["user"]),
                             self.candidate_tower(features["item"]), compute_metrics=False)

    return TwoTower()


def train(args) -> dict:
    tf, tfrs = import_tfrs()
    import numpy as np

    with np.load(args.pairs) as pairs:
        users, items = pairs["user"].astype(np.int64), pairs["item"].astype(np.int64)
    log(f"TF {tf.__version__}, TFRS {tfrs.__version__}: {len(users):,} training pairs, batch "
        f"{args.batch_size}, {args.warmup_steps} warm-up + {args.steps} timed steps")
    tf.keras.utils.set_random_seed(args.seed)
    data = (tf.data.Dataset.from_tensor_slices({"user": users, "item": items})
            .shuffle(len(users), seed=args.seed, reshuffle_each_iteration=True)
            .repeat().batch(args.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    model = build_model(tf, tfrs, np.unique(users), np.unique(items), args.dim)
    model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=args.learning_rate),
                  steps_per_execution=args.steps_per_execution)

    # Warm-up: traces and compiles the train function, which the timed fit reuses.
    t0 = time.perf_counter()
    model.fit(data, steps_per_epoch=args.warmup_steps, epochs=1, verbose=0)
    warmup_s = time.perf_counter() - t0
    # process_time: user + system CPU of every thread of this process (os.times' sum, finer).
    cpu0, t0 = time.process_time(), time.perf_counter()
    history = model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0
    examples = args.steps * args.batch_size
    log(f"{examples / seconds:,.0f} examples/s, {examples / cpu_s:,.0f} examples/CPU-s")
    return {"side": "tfrs", "batch_size": args.batch_size, "steps": args.steps,
            "warmup_steps": args.warmup_steps, "warmup_seconds": warmup_s, "seconds": seconds,
            "cpu_seconds": cpu_s, "examples_per_sec": examples / seconds,
            "window_examples_per_sec": examples / seconds,  # the timed steps alone, as recsys's
            "examples_per_cpu_s": examples / cpu_s,
            "final_loss": float(history.history["loss"][-1]),
            "tensorflow": tf.__version__, "tensorflow_recommenders": tfrs.__version__}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probe", action="store_true", help="print TF/TFRS versions and exit")
    p.add_argument("--pairs", help="npz with int arrays 'user' and 'item' (one training pair each)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=100, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps before timing (compile)")
    p.add_argument("--dim", type=int, default=32, help="embedding width")
    p.add_argument("--learning-rate", type=float, default=0.1, help="Adagrad learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-per-execution", type=int, default=1,
                   help="Keras steps per tf.function call (compile's steps_per_execution)")
    args = p.parse_args(argv)
    if args.probe:
        tf, tfrs = import_tfrs()
        print(json.dumps({"tensorflow": tf.__version__, "tensorflow_recommenders": tfrs.__version__}))
        return
    if not args.pairs:
        p.error("--pairs is required (or --probe)")
    print(json.dumps(train(args)), flush=True)


if __name__ == "__main__":
    main()
