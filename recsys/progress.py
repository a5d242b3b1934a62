"""Progress of long stages: a tqdm bar on a terminal, timed INFO lines on logger "recsys" elsewhere.

Every long stage (retrieval training, the ranker's shadow retrieval model, cross-validation and
final fit, export, index build, pipeline evaluation) reports through `Progress`:

    with Progress("retrieval", total=num_steps, initial=start) as progress:
        for ...:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")

Where it goes (process 0 only; other processes stay silent):
  - stderr is a terminal: a tqdm bar. TQDM_DISABLE=1 turns the bar off (read when the stage
    starts); then only a stage's messages (`write`, e.g. early stopping) are logged.
  - stderr is not a terminal (a file, a pipe, a test's capture): INFO lines on logger "recsys":
    one when the stage starts, one at most every `every_s` seconds with done/total, rate and ETA
    (both over the units since the previous line), and a final one with the elapsed time and
    the mean rate. TQDM_DISABLE does not silence these (it is about bars);
    `logging.getLogger("recsys").setLevel(logging.WARNING)` does.
Lines look like
    retrieval: start at 0/1500 steps
    retrieval: 500/1500 steps (33%), 41.2 steps/s, ETA 24s, loss=4.1234
    retrieval: done 1500/1500 steps in 37s, 40.5 steps/s, loss=3.9876
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Self

import jax
from tqdm import tqdm

LOG = logging.getLogger("recsys")
EVERY_S = 5.0  # seconds between log lines of a stage when stderr is not a terminal


def bars_disabled() -> bool:
    """TQDM_DISABLE is set (and not 0/false), read now: tqdm itself reads it once, at import."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def duration(seconds: float) -> str:
    """'37s', '4m05s', '1h02m'."""
    s = round(max(seconds, 0.0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _rate(per_s: float) -> str:
    return f"{per_s:.0f}" if per_s >= 100 else f"{per_s:.1f}" if per_s >= 10 else f"{per_s:.2f}"


class Progress:
    """Progress of one stage towards `total` units (see the module docstring for where it goes).

    Args:
      stage: its name, first on every line ("retrieval", "export", ...).
      total: units the stage does (steps, requests, parts).
      initial: units already done (a resumed run).
      unit: what is counted, shown after the counts and in the rate ("steps", "requests").
      every_s: seconds between log lines.
      stream: where a bar would go; whether it is a terminal decides bar or log lines.
    """

    def __init__(self, stage: str, total: int, *, initial: int = 0, unit: str = "steps",
                 every_s: float = EVERY_S, stream=None):
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        self.done = self._initial = initial
        self._postfix: dict[str, str] = {}
        self._bar = None
        self._closed = False
        self._stream = stream = sys.stderr if stream is None else stream
        if jax.process_index() != 0:
            self._mode = "silent"
        elif getattr(stream, "isatty", lambda: False)():
            self._mode = "quiet" if bars_disabled() else "bar"  # quiet: only write()'s messages
            if self._mode == "bar":
                self._bar = tqdm(total=total, initial=initial, desc=stage, unit=unit, file=stream,
                                 dynamic_ncols=True, disable=False)  # decided above
        else:
            self._mode = "log"
            LOG.info("%s: start at %d/%d %s", stage, initial, total, unit)
        self._t0 = self._last = time.monotonic()
        self._last_done = initial

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif (self._mode == "log" and self.done < self.total
              and time.monotonic() - self._last >= self.every_s):  # the last line is close's
            self._line()

    def set_postfix(self, **values) -> None:
        """Values shown beside the counts (loss, validation metrics), each as str(value)."""
        self._postfix.update({k: str(v) for k, v in values.items()})
        if self._bar is not None:
            self._bar.set_postfix(self._postfix)

    def write(self, message: str) -> None:
        """A message of this stage: above the bar, or a log line (also without a bar)."""
        if self._bar is not None:
            tqdm.write(message, file=self._stream)  # above the bar (tqdm's default is stdout)
        elif self._mode != "silent":
            LOG.info("%s: %s", self.stage, message)

    def close(self, error: bool = False) -> None:
        """Ends the stage: the bar closes, or a final line with the elapsed time (once)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._mode == "log":
            elapsed = time.monotonic() - self._t0
            how = "failed at" if error else "done" if self.done >= self.total else "stopped at"
            rate = f", {_rate(self._per_s(elapsed))} {self.unit}/s" if self.total > 1 else ""
            LOG.info("%s: %s %d/%d %s in %s%s%s", self.stage, how, self.done, self.total,
                     self.unit, duration(elapsed), rate, self._postfix_text())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(error=exc_type is not None)

    def _per_s(self, elapsed: float) -> float:
        return (self.done - self._initial) / elapsed if elapsed > 0 else 0.0

    def _postfix_text(self) -> str:
        return "".join(f", {k}={v}" for k, v in self._postfix.items())

    def _line(self) -> None:
        # Rate and ETA of the units since the previous line: the pace now, not since a start
        # that may have waited on compilation.
        now = time.monotonic()
        per_s = (self.done - self._last_done) / (now - self._last) if now > self._last else 0.0
        self._last, self._last_done = now, self.done
        left = max(self.total - self.done, 0)
        eta = duration(left / per_s) if per_s > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        LOG.info("%s: %d/%d %s (%.0f%%), %s %s/s, ETA %s%s", self.stage, self.done, self.total,
                 self.unit, pct, _rate(per_s), self.unit, eta, self._postfix_text())
