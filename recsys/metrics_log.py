"""Scalars to watch while a run trains: WORKDIR/metrics.jsonl and TensorBoard files in WORKDIR/tb.

WORKDIR/metrics.jsonl: one JSON object per line, appended in the order written:

    {"step": 500, "stage": "retrieval", "time": 41.7, "train/loss": 4.12, ...}

  step   int: the stage's own step (retrieval steps; the ranker's training steps).
  stage  "retrieval" (the served two-tower model), "shadow_retrieval" (the retrieval model whose
         features the ranker learns, trained beside it) or "ranker".
  time   float: seconds since the command that wrote the line started (`started`; a resumed
         run starts again from 0).
  other  scalar metrics (float; null where not finite, e.g. a NaN loss), by stage:
    retrieval, shadow_retrieval: every train.log_every steps train/loss, train/learning_rate,
      train/examples_per_sec (0 until a step after the compiling one was timed); at each
      evaluation (train.eval_every) val/hr@K and val/ndcg@K for K in eval.ks and 10, and
      val/mrr (validation split).
    ranker: at each K-fold evaluation val/ndcg@10 and val/hr@10 (mean over the held-out folds;
      step 0 is the retrieval order), and train/final_loss at the step count the final fit ran.
  A resumed run appends: the steps it runs again (those after its last checkpoint) appear again,
  and the later line is the one that counts. A ranker trained again (its retrieval model changed)
  writes its steps again the same way.

WORKDIR/tb/<stage>/: TensorBoard event files (tensorboardX) with the same scalars, one
  TensorBoard run per stage, global step = step, tag = key with the characters TensorBoard
  refuses written as _ (val/hr@10 -> val/hr_10; `tb_tag`). A stage that trains again hides what
  an earlier run of it logged past the step it restarts from (tensorboardX's purge_step): past
  the resumed checkpoint's step, or all of a ranker trained again.

Only process 0 writes. Files are flushed at evaluation and checkpoint boundaries (`flush`) and
closed by `close` (the `with` block ends, on errors too).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import time
from typing import Self

import jax
from tensorboardX import SummaryWriter

JSONL = "metrics.jsonl"
TB_DIR = "tb"


def tb_tag(key: str) -> str:
    """The TensorBoard tag of a key: characters TensorBoard refuses (such as @) become _."""
    return re.sub(r"[^-/\w.]", "_", key)


class MetricsLog:
    """Appends scalars of a run's stages to WORKDIR/metrics.jsonl and WORKDIR/tb/<stage>/.

    Args:
      workdir: the run's directory (made when missing).
      started: time.time() of the command's start ("time" counts from it; default: now).
    """

    def __init__(self, workdir: pathlib.Path, started: float | None = None):
        self.workdir = pathlib.Path(workdir)
        self.started = time.time() if started is None else started
        self.active = jax.process_index() == 0
        self._file = None
        self._writers: dict[str, SummaryWriter] = {}

    def begin(self, stage: str, first_step: int) -> None:
        """A stage (re)starts training and will write steps from `first_step` on: TensorBoard
        forgets what an earlier run of it logged at `first_step` or later."""
        if not self.active:
            return
        self._close_writer(stage)
        self._writers[stage] = self._writer(stage, purge_step=first_step)

    def write(self, stage: str, step: int, scalars: dict) -> None:
        """One line of metrics.jsonl and one TensorBoard scalar per key."""
        if not self.active:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        finite = {k: v if math.isfinite(v) else None for k, v in scalars.items()}
        if self._file is None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.workdir / JSONL, "a", encoding="utf-8")  # noqa: SIM115 (close())
        record = {"step": int(step), "stage": stage,
                  "time": round(time.time() - self.started, 3), **finite}
        self._file.write(json.dumps(record) + "\n")
        writer = self._writers.get(stage)
        if writer is None:
            writer = self._writers[stage] = self._writer(stage)
        for key, value in scalars.items():
            writer.add_scalar(tb_tag(key), value, global_step=int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for stage in list(self._writers):
            self._close_writer(stage)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _writer(self, stage: str, purge_step: int | None = None) -> SummaryWriter:
        # A name of its own: tensorboardX names files by the second, and two writers of one
        # stage in the same second would otherwise write over each other.
        return SummaryWriter(str(self.workdir / TB_DIR / stage), purge_step=purge_step,
                             filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def _close_writer(self, stage: str) -> None:
        writer = self._writers.pop(stage, None)
        if writer is not None:
            writer.close()
