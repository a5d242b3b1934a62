"""HTTP serving under load with a hot reload halfway: failed requests (must be 0), the versions
that answered, and loopback latency beside the same requests run in process.

    python -m benchmarks.http --artifacts runs/tiny/artifacts --json http.json

Without --artifacts, configs/tiny.py is run in a temporary directory to make some. The current
version of the artifacts is copied into a temporary root (yours is left as it is) and served by
`recsys serve-http` (a process of its own) on a free loopback port; 8 client threads send
--requests single requests (random known users, k=10) over keep-alive connections. When half have been answered a new
version is published (`recsys index` on the copy: the index rebuilt, other files linked) and
POST /admin/reload swaps it in while the clients go on. Then the same requests run one at a time
through `Recommender.recommend` in this process. The load average is recorded beside the
figures (the machine may be shared).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import provenance
from recsys import artifacts
from recsys.serve import Recommender

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def staged_copy(source: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
    """A new artifacts root in workdir holding a copy of source's current version."""
    with artifacts.reading(source) as version:
        manifest = artifacts.verify(version)

        def write(staging: pathlib.Path) -> dict:
            for name in manifest["checksums"]:
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(version / name, staging / name)
            return manifest

        root = workdir / "artifacts"
        artifacts.publish(root, write)
    return root


def tiny_artifacts(workdir: pathlib.Path) -> pathlib.Path:
    from recsys import config as config_lib
    from recsys import pipeline
    pipeline.run(config_lib.load(CONFIG), workdir / "tiny")
    return workdir / "tiny" / "artifacts"


def client(url: str, reqs: list[dict], out: list, deadline: float) -> None:
    """Sends reqs one by one; appends (ms, version or None, error or None, end time) each."""
    with httpx.Client(base_url=url, timeout=60) as c:
        for req in reqs:
            if time.monotonic() > deadline:
                return
            t0 = time.perf_counter()
            version, error = None, None
            try:
                response = c.post("/recommend", json=req)
                body = response.json()
                if response.status_code == 200:
                    version = body["version"]
                else:
                    error = f"{response.status_code}: {body}"
            except Exception as e:  # noqa: BLE001 - counted as a failed request
                error = repr(e)
            end = time.perf_counter()
            out.append(((end - t0) * 1e3, version, error, end))


def wait(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmarks.http: timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def served(root: pathlib.Path, log_path: pathlib.Path) -> Iterator[str]:
    """`recsys serve-http` on a free loopback port, in a process of its own (as deployed: the
    clients here do not share its interpreter); yields its base URL, stops it with SIGINT."""
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "recsys", "serve-http", "--artifacts",
                                   str(root), "--port", "0"], stdout=log, stderr=subprocess.STDOUT)
    try:
        found = []

        def listening() -> bool:
            if server.poll() is not None:
                raise SystemExit(f"benchmarks.http: the server exited: {log_path.read_text()}")
            found[:] = re.findall(r"listening on (http://\S+)", log_path.read_text())
            return bool(found)

        wait(listening, 120, "the server to listen")
        yield found[0]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def measure(root: pathlib.Path, num_requests: int, threads: int, workdir: pathlib.Path,
            seed: int = 0) -> dict:
    from recsys import pipeline
    rec = Recommender.load(root)  # the in-process baseline, and the users to ask for
    ids = rec.artifacts.users.ids
    rng = np.random.default_rng(seed)
    reqs = [{"user_id": u, "k": 10} for u in ids[rng.integers(0, len(ids), num_requests)].tolist()]
    with served(root, workdir / "server.log") as url, \
            httpx.Client(base_url=url, timeout=600) as admin:
        wait(lambda: admin.get("/healthz").status_code == 200, 600, "the server to load")
        for req in reqs[:50]:  # warm caches (numpy, ScaNN); compiles were in the load
            admin.post("/recommend", json=req)
        results: list = []
        deadline = time.monotonic() + 1800
        workers = [threading.Thread(target=client, args=(url, reqs[i::threads], results, deadline))
                   for i in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        wait(lambda: len(results) >= num_requests // 2, 1800, "half of the requests")
        r0 = time.perf_counter()
        pipeline.rebuild_index(root, [])  # publishes a new version
        reloaded = admin.post("/admin/reload").json()
        reload_s = time.perf_counter() - r0
        for w in workers:
            w.join()
        wall_s = max(r[3] for r in results) - t0
        metrics = admin.get("/metrics").text
    in_process = []
    for req in reqs:
        s = time.perf_counter()
        rec.recommend(**req)
        in_process.append((time.perf_counter() - s) * 1e3)
    ms = np.asarray([r[0] for r in results])
    versions = [r[1] for r in results if r[1] is not None]
    failures = [r[2] for r in results if r[2] is not None]
    return {"requests": len(results), "failed_requests": len(failures),
            "first_failures": failures[:5],
            "versions_seen": {v: versions.count(v) for v in dict.fromkeys(versions)},
            "reload": reloaded, "publish_and_reload_s": round(reload_s, 2),
            "p50_ms": _round(np.percentile(ms, 50)), "p99_ms": _round(np.percentile(ms, 99)),
            "requests_per_second": round(len(results) / wall_s, 1),
            "in_process_p50_ms": _round(np.percentile(in_process, 50)),
            "in_process_p99_ms": _round(np.percentile(in_process, 99)),
            "server_errors_counted": _errors_counted(metrics),
            "client_threads": threads, "num_items": int(rec.artifacts.manifest["num_items"])}


def _errors_counted(metrics_text: str) -> float:
    """recsys_http_errors_total summed over its labels, from the server's /metrics."""
    return sum(s.value for f in text_string_to_metric_families(metrics_text)
               if f.name == "recsys_http_errors" for s in f.samples if s.name.endswith("_total"))


def _round(x) -> float:
    return round(float(x), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", help="artifacts root (default: a configs/tiny.py run here)")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=8, help="client threads")
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="recsys-http-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        source = pathlib.Path(args.artifacts) if args.artifacts else tiny_artifacts(tmp)
        before = os.getloadavg()
        run = measure(staged_copy(source, tmp), args.requests, args.threads, tmp)
    result = {**run, "load_average_before": before, "load_average_after": os.getloadavg(),
              "cpus": os.cpu_count(), "artifacts": args.artifacts or "configs/tiny.py (fresh run)",
              "provenance": provenance.record()}
    provenance.emit(result, args.json)


if __name__ == "__main__":
    main()
