"""recsys.progress: a bar on a terminal, timed log lines with rate and ETA elsewhere; and every
stage of `recsys pipeline` leaves its lines in a log file."""

import io
import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest

from recsys import progress as progress_lib
from recsys.progress import Progress

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress_lib.time, "monotonic", fake)
    return fake


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "recsys"]


def test_log_lines_every_few_seconds_with_rate_and_eta(caplog, clock):
    caplog.set_level(logging.INFO, logger="recsys")
    with Progress("retrieval", 20, every_s=5.0, stream=io.StringIO()) as p:
        for _ in range(12):  # one step a second
            clock.now += 1.0
            p.update(1)
            p.set_postfix(loss="4.2000")
    assert lines(caplog) == [
        "retrieval: start at 0/20 steps",
        "retrieval: 5/20 steps (25%), 1.00 steps/s, ETA 15s, loss=4.2000",
        "retrieval: 10/20 steps (50%), 1.00 steps/s, ETA 10s, loss=4.2000",
        "retrieval: stopped at 12/20 steps in 12s, 1.00 steps/s, loss=4.2000",
    ]


def test_a_resumed_stage_counts_its_rate_from_where_it_resumed(caplog, clock):
    caplog.set_level(logging.INFO, logger="recsys")
    with Progress("retrieval", 1000, initial=400, every_s=5.0, stream=io.StringIO()) as p:
        for _ in range(600):
            clock.now += 0.5
            p.update(1)
    out = lines(caplog)
    assert out[0] == "retrieval: start at 400/1000 steps"
    assert out[1] == "retrieval: 410/1000 steps (41%), 2.00 steps/s, ETA 4m55s"
    assert out[-1] == "retrieval: done 1000/1000 steps in 5m00s, 2.00 steps/s"


def test_rate_and_eta_are_the_pace_since_the_previous_line(caplog, clock):
    caplog.set_level(logging.INFO, logger="recsys")
    with Progress("ranker fit", 200, every_s=5.0, stream=io.StringIO()) as p:
        clock.now += 10.0  # the first step compiles
        p.update(1)
        for _ in range(60):
            clock.now += 0.125
            p.update(1)
    assert lines(caplog)[1:3] == ["ranker fit: 1/200 steps (0%), 0.10 steps/s, ETA 33m10s",
                                  "ranker fit: 41/200 steps (20%), 8.00 steps/s, ETA 20s"]


def test_tqdm_disable_silences_bars_not_log_lines(caplog, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    caplog.set_level(logging.INFO, logger="recsys")
    stream = io.StringIO()
    with Progress("export", 3, unit="parts", stream=stream) as p:
        p.update(3)
    assert stream.getvalue() == ""
    out = lines(caplog)
    assert out[0] == "export: start at 0/3 parts"
    assert re.fullmatch(r"export: done 3/3 parts in 0s, [\d.]+ parts/s", out[-1]), out


def test_a_terminal_gets_a_bar_and_no_log_lines(caplog, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    caplog.set_level(logging.INFO, logger="recsys")
    terminal = Terminal()
    with Progress("ranker fit", 4, stream=terminal) as p:
        p.update(4)
        p.write("a note")
    assert "ranker fit" in terminal.getvalue() and "4/4" in terminal.getvalue()
    assert "a note" in terminal.getvalue()
    assert lines(caplog) == []
    # TQDM_DISABLE on a terminal: no bar and no progress lines; messages are still logged.
    monkeypatch.setenv("TQDM_DISABLE", "1")
    quiet = Terminal()
    with Progress("ranker fit", 4, stream=quiet) as p:
        p.update(4)
        p.write("a note")
    assert quiet.getvalue() == "" and lines(caplog) == ["ranker fit: a note"]


def test_an_error_ends_the_stage_with_a_failed_line(caplog, clock):
    caplog.set_level(logging.INFO, logger="recsys")
    with pytest.raises(RuntimeError), Progress("index build", 1, unit="indexes",
                                               stream=io.StringIO()):
        clock.now += 65
        raise RuntimeError("boom")
    assert lines(caplog)[-1] == "index build: failed at 0/1 indexes in 1m05s"


def test_messages_and_other_processes(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="recsys")
    with Progress("retrieval", 10, stream=io.StringIO()) as p:
        p.write("early stopping at step 4")
    assert "retrieval: early stopping at step 4" in lines(caplog)
    caplog.clear()
    monkeypatch.setattr(progress_lib.jax, "process_index", lambda: 1)
    with Progress("retrieval", 10, every_s=0.0, stream=io.StringIO()) as p:
        p.update(5)
        p.write("not shown")
    assert lines(caplog) == []


def test_duration_format():
    assert [progress_lib.duration(s) for s in (0, 59.4, 61, 3599, 3725)] == [
        "0s", "59s", "1m01s", "59m59s", "1h02m"]


@pytest.mark.e2e
def test_pipeline_output_to_a_file_has_progress_lines_for_every_stage(tmp_path):
    """`recsys pipeline ... > log 2>&1` (no terminal, TQDM_DISABLE unset): each stage's lines."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TQDM_DISABLE")}
    log = tmp_path / "log.txt"
    command = [sys.executable, "-m", "recsys", "pipeline", "--config",
               str(ROOT / "configs" / "tiny.py"), "--workdir", str(tmp_path / "run")]
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                timeout=600, check=False)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    stages = ["retrieval", "shadow_retrieval", "ranker events", "ranker cv (3 folds)", "ranker fit",
              "export", "index build", "evaluate retrieval", "load recommender", "index recall",
              "evaluate pipeline"]
    for stage in stages:
        name = rf"^\S+ recsys {re.escape(stage)}:"  # the CLI's format: time, logger, message
        assert re.search(rf"{name} start at 0/\d+ ", text, re.MULTILINE), stage
        assert re.search(rf"{name} done (\d+)/\1 [\w -]+ in \d", text, re.MULTILINE), stage
    assert re.search(r"recsys retrieval: done 40/40 steps in \d+s, [\d.]+ steps/s, loss=", text)
    assert re.search(r"recsys evaluate pipeline: done 900/900 requests in \d+s, [\d.]+ requests/s",
                     text)
    assert "absl" not in text  # other libraries' INFO chatter stays out of the log
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
