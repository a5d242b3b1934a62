"""Overlapping the host with the device: batches built ahead on a thread, step times read behind.

The training loop dispatches step N and, without waiting for it, takes batch N+1 from a
`Prefetcher` (built and placed on the mesh while the device ran earlier steps); a `StepClock`
reads each call's completion on its own thread, so the loop never blocks on the device except
where it needs a value (logging, evaluation, checkpoints) and still knows how long the device
was busy.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable

_DONE = object()


class Prefetcher:
    """Yields `build(item)` for each item in order, computed up to `depth` items ahead.

    `build` runs on one background thread (depth 0: inline, on the caller's thread). An
    exception in it is raised by `get` at the item that failed. `close` stops the thread and
    drops what was built but not taken (e.g. after early stopping).

    Attributes:
      build_seconds: total wall seconds spent in `build` (the host's input work).
      wait_seconds: total seconds `get` waited for a batch that was not ready (input stalls).
    """

    def __init__(self, build: Callable, items: Iterable, depth: int):
        self._build, self._items, self.depth = build, iter(items), depth
        self.build_seconds = 0.0
        self.wait_seconds = 0.0
        self._stop = threading.Event()
        self._thread = None
        if depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._run, name="recsys-prefetch", daemon=True)
            self._thread.start()

    def _timed_build(self, item):
        t0 = time.perf_counter()
        out = self._build(item)
        self.build_seconds += time.perf_counter() - t0
        return out

    def _run(self) -> None:
        try:
            for item in self._items:
                if self._stop.is_set():  # closed: build nothing more
                    return
                out = self._timed_build(item)
                while not self._put((item, out)):
                    if self._stop.is_set():
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised at its get()
            self._put((None, e), wait=True)
            return
        self._put((None, _DONE), wait=True)

    def _put(self, entry, wait: bool = False) -> bool:
        while True:
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                if self._stop.is_set() or not wait:
                    return False

    def get(self):
        """(item, built) for the next item; StopIteration after the last."""
        if self._thread is None:
            item = next(self._items)
            return item, self._timed_build(item)
        t0 = time.perf_counter()
        item, out = self._queue.get()
        self.wait_seconds += time.perf_counter() - t0
        if out is _DONE:
            raise StopIteration
        if isinstance(out, BaseException):
            raise out
        return item, out

    def __iter__(self):
        while True:
            try:
                yield self.get()
            except StopIteration:
                return

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():  # the producer sees the flag at its next item or put
                try:  # unblock a producer waiting for room
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StepClock:
    """Device-busy seconds of a stream of jitted calls, read on a background thread.

    `started(out, n)` is called right after a call is dispatched, with an output of that call
    and the number of steps it ran. The thread waits for each output in order; a call's busy
    time runs from when it could start (its dispatch, or the previous call's completion if
    later) to its completion. The first call (compilation) is left out of `busy_seconds`.
    """

    def __init__(self):
        self.busy_seconds = 0.0
        self.steps = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="recsys-step-clock", daemon=True)
        self._thread.start()

    def started(self, out, steps: int) -> None:
        self._queue.put((time.perf_counter(), out, steps))

    def _run(self) -> None:
        last_done = None
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            t_start, out, steps = entry
            with contextlib.suppress(Exception):  # the loop meets the error where it reads a value
                out.block_until_ready()
            done = time.perf_counter()
            if last_done is not None:
                self.busy_seconds += done - max(t_start, last_done)
                self.steps += steps
            last_done = done

    def close(self) -> None:
        """Waits for every dispatched call, then stops the thread."""
        self._queue.put(None)
        self._thread.join()
