#!/usr/bin/env python3
"""Runs one command as N cooperating JAX processes on this machine (CPU devices or local GPUs).

    python launch/local.py --num-processes 2 --devices-per-process 4 -- \
        recsys train --config configs/tiny.py --workdir runs/mp

Each child gets RECSYS_COORDINATOR / RECSYS_NUM_PROCESSES / RECSYS_PROCESS_ID (read by
recsys.sharding.maybe_initialize_distributed) and either JAX_NUM_CPU_DEVICES (CPU, the
default; XLA_FLAGS is removed so it cannot override the count) or, with --gpus-per-process K,
JAX_LOCAL_DEVICE_IDS naming its K GPUs. Output lines are prefixed with the child's rank. The
launcher exits 0 when every child does; when one fails, on --timeout (exit 124) or on Ctrl-C
(exit 130) it terminates its own children (each in its own process group) and nothing else.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL when stopping children


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--devices-per-process", type=int, default=1,
                   help="CPU devices per process (ignored with --gpus-per-process)")
    p.add_argument("--gpus-per-process", type=int, default=0,
                   help="give process i the GPUs i*K .. i*K+K-1 (JAX_LOCAL_DEVICE_IDS)")
    p.add_argument("--port", type=int, default=0, help="coordinator port (0 = pick a free one)")
    p.add_argument("--timeout", type=float, default=0, help="seconds before all are stopped (0 = none)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        p.error("give the command after --, e.g. -- recsys train --config ... --workdir ...")
    if args.num_processes < 1 or args.devices_per_process < 1 or args.gpus_per_process < 0:
        p.error("--num-processes and --devices-per-process must be >= 1")
    return args


def child_env(rank: int, args: argparse.Namespace, port: int) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # a host device count there would override ours
    env.update(RECSYS_COORDINATOR=f"127.0.0.1:{port}", RECSYS_NUM_PROCESSES=str(args.num_processes),
               RECSYS_PROCESS_ID=str(rank), PYTHONUNBUFFERED="1")
    if args.gpus_per_process:
        k = args.gpus_per_process
        env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(rank * k + i) for i in range(k))
    else:
        env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(args.devices_per_process))
    return env


def resolve(command: list[str]) -> list[str]:
    """`recsys ...` runs with this interpreter, so the launcher's virtualenv is the children's."""
    if command[0] == "recsys":
        return [sys.executable, "-m", "recsys", *command[1:]]
    return command


def _pump(rank: int, stream) -> None:
    for line in stream:  # text mode: '\r' progress updates arrive as lines too
        sys.stdout.write(f"[{rank}] {line if line.endswith(chr(10)) else line + chr(10)}")
        sys.stdout.flush()


def stop(children: list[subprocess.Popen]) -> None:
    """SIGTERM each child's own process group (what it started too), SIGKILL after a grace.

    Each child leads a session of its own, so its group id is its pid and holds nothing else.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for c in children:
            try:
                os.killpg(c.pid, sig)
            except ProcessLookupError:  # the child and everything it started are gone
                pass
        deadline = time.monotonic() + GRACE_SECONDS
        while sig == signal.SIGTERM and any(c.poll() is None for c in children) \
                and time.monotonic() < deadline:
            time.sleep(0.05)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc  # killed by signal s -> 128 + s, as shells report it


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    port = args.port
    if not port:
        import portpicker
        port = portpicker.pick_unused_port()
    command = resolve(args.command)
    children, pumps = [], []
    signal.signal(signal.SIGTERM, _interrupt)  # `kill <launcher>` stops the children too
    # Ctrl-C too, even when started by a parent that ignores SIGINT (Python then leaves it
    # ignored: nohup, some CI runners and test harnesses do this)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        for rank in range(args.num_processes):
            c = subprocess.Popen(command, env=child_env(rank, args, port), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, errors="replace",
                                 start_new_session=True)
            children.append(c)
            pumps.append(threading.Thread(target=_pump, args=(rank, c.stdout), daemon=True))
            pumps[-1].start()
        deadline = time.monotonic() + args.timeout if args.timeout else None
        while True:
            codes = [c.poll() for c in children]
            failed = [(r, rc) for r, rc in enumerate(codes) if rc not in (None, 0)]
            if failed:
                rank, rc = failed[0]
                pumps[rank].join(timeout=2)  # its last words (the traceback) first
                print(f"[launch] process {rank} exited with {rc}; stopping the others", flush=True)
                return finish(children, pumps, exit_code(rc))
            if all(rc == 0 for rc in codes):
                return finish(children, pumps, 0)  # stops anything they left running
            if deadline is not None and time.monotonic() > deadline:
                print(f"[launch] timeout after {args.timeout:g} s; stopping all processes", flush=True)
                return finish(children, pumps, 124)
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("[launch] interrupted; stopping all processes", flush=True)
        return finish(children, pumps, 130)


def finish(children: list[subprocess.Popen], pumps: list[threading.Thread], code: int) -> int:
    stop(children)
    for t in pumps:
        t.join(timeout=2)
    return code


if __name__ == "__main__":
    sys.exit(main())
