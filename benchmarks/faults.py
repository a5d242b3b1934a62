"""The fault campaign: kill -9 and resume, corrupted files, fuzzed requests, concurrent publication.

    python -m benchmarks.faults --json faults.json          # about 15 min on 2 cores

Every trial runs the real CLI or the real serving API on configs/tiny.py, and the result is
one JSON object (keys below) plus a table for docs/reliability.md:
  kill_resumes, kill_resumes_exact  runs killed with SIGKILL at a random moment (some while a
                                    checkpoint is being written), then resumed: how many
                                    finished, and how many ended bit-identical to a straight
                                    run (same final loss, same exported item vectors)
  corruption_cases, corruption_refused
                                    truncate / flip / delete of every file of a checkpoint
                                    step and of an artifacts version: refused means the
                                    command ended with one error line naming the problem (exit
                                    2), or, for a checkpoint step, skipped it with a warning
                                    naming it; `silently_accepted` and `tracebacks` count the rest
  malicious_bundles, code_executions, outside_reads
                                    artifacts crafted to run code or read outside the bundle
  fuzzed_requests, other_exceptions requests of random, hostile field values: each must give
                                    a result or a RequestError
  publish_failed_loads              loads that failed while export republished 20 times
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import provenance
from recsys import artifacts

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
STEPS = 60
# Dropout on, so the RNG streams in the state matter for exact resumption; checkpoints often,
# so a random kill lands inside a save now and then.
TRAIN_SETS = ["ranker.steps=0", "model.dropout=0.1", "train.log_every=1000",
              f"train.num_steps={STEPS}", "train.checkpoint_every=4"]
# The corruption and publication runs also train and export the ranker (its checkpoint and files).
BASE_SETS = [s for s in TRAIN_SETS if not s.startswith("ranker.")] + ["train.keep_checkpoints=1"]


def recsys(*args: str, sets=(), timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "recsys", *args]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout,
                          check=False)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["TQDM_DISABLE"] = "1"
    return env


def _train_cmd(workdir: pathlib.Path) -> list[str]:
    cmd = [sys.executable, "-m", "recsys", "train", "--config", TINY, "--workdir", str(workdir)]
    for s in TRAIN_SETS:
        cmd += ["--set", s]
    return cmd


def _outcome(workdir: pathlib.Path) -> tuple[float, str]:
    """(final loss, sha256 of the exported item vectors) of a finished training workdir."""
    result = recsys("export", "--config", TINY, "--workdir", str(workdir), sets=TRAIN_SETS)
    if result.returncode:
        raise RuntimeError(f"export failed in {workdir}: {result.stderr[-2000:]}")
    from recsys.serve import artifacts
    vectors = artifacts.load(workdir / "artifacts").item_vectors
    loss = json.loads((workdir / "metrics.json").read_text())["train/final_loss"]
    return loss, hashlib.sha256(vectors.tobytes()).hexdigest()


# ------------------------------------------------------------------------------ kill -9


def kill_trials(root: pathlib.Path, trials: int, rng: random.Random) -> dict:
    straight = root / "straight"
    t0 = time.time()
    result = subprocess.run(_train_cmd(straight), capture_output=True, text=True, env=_env(),
                            check=False)
    if result.returncode:
        raise RuntimeError(f"straight run failed: {result.stderr[-2000:]}")
    duration = time.time() - t0
    reference = _outcome(straight)
    resumed = exact = mid_save = 0
    for trial in range(trials):
        workdir = root / f"kill{trial}"
        proc = subprocess.Popen(_train_cmd(workdir), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=_env())
        # Half the trials wait for a save in flight (orbax writes a tmp directory first).
        deadline = time.time() + rng.uniform(0.3, 1.0) * duration
        want_save = trial % 2 == 1
        while proc.poll() is None and time.time() < deadline + (duration if want_save else 0):
            if want_save and time.time() >= deadline and _saving(workdir):
                mid_save += 1
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        result = subprocess.run(_train_cmd(workdir), capture_output=True, text=True,
                                env=_env(), check=False)
        if result.returncode == 0:
            resumed += 1
            exact += _outcome(workdir) == reference
        print(f"kill trial {trial}: resumed={result.returncode == 0} exact={exact}", flush=True)
    return {"kill_resumes": resumed, "kill_resumes_exact": exact, "kill_trials": trials,
            "kills_during_save": mid_save}


def _saving(workdir: pathlib.Path) -> bool:
    ckpt = workdir / "checkpoints" / "retrieval"
    return ckpt.is_dir() and any("tmp" in p.name for p in ckpt.iterdir())


# ------------------------------------------------------------------------------ corruption


def corrupt(path: pathlib.Path, mode: str) -> None:
    if mode == "delete":
        path.unlink()
    elif mode == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:  # flip 64 bytes (or all of a shorter file) in the middle
        data = bytearray(path.read_bytes())
        lo = max(0, len(data) // 2 - 32)
        for i in range(lo, min(len(data), lo + 64)):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))


def _one_error_line(result: subprocess.CompletedProcess) -> bool:
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    return (result.returncode == 2 and "Traceback" not in result.stderr
            and any(x.startswith("recsys ") and ": error: " in x for x in lines))


def corruption_cases(root: pathlib.Path) -> dict:
    """Each file of the last step of both checkpoints (retrieval, ranker) and of the current
    artifacts version, 3 ways."""
    base = root / "base"
    sets = BASE_SETS
    for command in ("train", "export"):
        result = recsys(command, "--config", TINY, "--workdir", str(base), sets=sets)
        if result.returncode:
            raise RuntimeError(f"{command} failed: {result.stderr[-2000:]}")
    version = artifacts.published(base / "artifacts")
    targets = []
    for model in ("retrieval", "ranker"):
        last = max((base / "checkpoints" / model).glob("[0-9]*"), key=lambda p: int(p.name))
        targets += [("checkpoint", p) for p in sorted(last.rglob("*")) if p.is_file()]
    targets += [("artifact", p) for p in sorted(version.rglob("*")) if p.is_file()]
    counts = {"corruption_cases": 0, "corruption_refused": 0, "silently_accepted": 0,
              "tracebacks": 0, "accepted_files": [], "traceback_examples": []}
    for kind, path in targets:
        for mode in ("truncate", "flip", "delete"):
            case = root / "case"
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(base, case, symlinks=True)
            corrupt(case / path.relative_to(base), mode)
            if kind == "checkpoint":
                result = recsys("eval", "--config", TINY, "--workdir", str(case), sets=sets)
            else:
                result = recsys("serve", "--artifacts", str(case / "artifacts"), "--user", "1")
            counts["corruption_cases"] += 1
            if _one_error_line(result):
                counts["corruption_refused"] += 1
            elif "Traceback" in result.stderr:
                counts["tracebacks"] += 1
                counts["accepted_files"].append(f"{mode} {path.relative_to(base)}: traceback")
                if len(counts["traceback_examples"]) < 3:
                    counts["traceback_examples"].append(result.stderr[-3000:])
            else:
                counts["silently_accepted"] += 1
                counts["accepted_files"].append(f"{mode} {path.relative_to(base)}")
            print(f"{kind} {mode} {path.relative_to(base)}: rc {result.returncode}", flush=True)
    shutil.rmtree(root / "case", ignore_errors=True)
    return counts


# ------------------------------------------------------------------------------ malicious bundles


def malicious_bundles(root: pathlib.Path) -> dict:
    """Bundles crafted to run code (a pickle) or read outside the directory; none may load."""
    from recsys.serve import Recommender
    base = artifacts.published(root / "base" / "artifacts")
    outside = root / "outside"
    outside.mkdir(exist_ok=True)
    marker = root / "pwned"
    shutil.copy(base / "item_vectors.npy", outside / "rows.npy")
    cases = {
        "pickle in the index": lambda b: _drop_pickle(b, marker),
        "unlisted file": lambda b: (b / "extra.bin").write_bytes(b"x"),
        "symlinked vectors": lambda b: _symlink(b / "item_vectors.npy", outside / "rows.npy"),
        "manifest key escaping": lambda b: _manifest_key(b, "../outside/rows.npy", outside),
        "manifest key absolute": lambda b: _manifest_key(b, str(outside / "rows.npy"), outside),
        "index asset escaping": lambda b: _index_asset_escape(b, outside),
    }
    executions = outside_reads = refused = 0
    for name, craft in cases.items():
        bundle = root / "bundle"
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.copytree(base, bundle, symlinks=True)
        craft(bundle)
        # Access times set before the modification times: even a relatime mount records a read.
        for p in outside.iterdir():
            os.utime(p, ns=(1, p.stat().st_mtime_ns))
        atimes = {p: p.stat().st_atime_ns for p in outside.iterdir()}
        try:
            Recommender.load(bundle, warmup=False)
        except ValueError:
            refused += 1
        executions += marker.exists()
        outside_reads += any(p.stat().st_atime_ns != t for p, t in atimes.items())
        marker.unlink(missing_ok=True)
        print(f"malicious bundle {name!r}: refused={refused}", flush=True)
    # Controls: the two detectors do see a read of the outside file and an unpickled payload.
    target = outside / "rows.npy"
    os.utime(target, ns=(1, target.stat().st_mtime_ns))
    target.read_bytes()
    read_seen = target.stat().st_atime_ns != 1
    _drop_pickle(root / "control", marker)
    import pickle
    for path in (root / "control").rglob("*.pkl"):
        pickle.loads(path.read_bytes())
    executed = marker.exists()
    marker.unlink(missing_ok=True)
    return {"malicious_bundles": len(cases), "malicious_refused": refused,
            "code_executions": executions, "outside_reads": outside_reads,
            "detectors_work": bool(read_seen and executed)}


def _drop_pickle(bundle: pathlib.Path, marker: pathlib.Path) -> None:
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for target in [*bundle.rglob("*.pkl")] or [bundle / "index" / "scann" / "scann_docids.pkl"]:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(pickle.dumps(Payload()))


def _symlink(path: pathlib.Path, target: pathlib.Path) -> None:
    path.unlink()
    path.symlink_to(target)


def _manifest_key(bundle: pathlib.Path, key: str, outside: pathlib.Path) -> None:
    from recsys.artifacts import MANIFEST
    manifest = json.loads((bundle / MANIFEST).read_text())
    files = manifest.get("files", manifest.get("checksums"))
    digest = hashlib.sha256((outside / "rows.npy").read_bytes()).hexdigest()
    files[key] = ({"sha256": digest, "size": (outside / "rows.npy").stat().st_size}
                  if isinstance(next(iter(files.values())), dict) else digest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def _index_asset_escape(bundle: pathlib.Path, outside: pathlib.Path) -> None:
    """Points every path the index's own files name at a file outside the bundle."""
    for path in (bundle / "index").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".pbtxt"):
            text = path.read_text(errors="replace")
            for name in ("dataset.npy", "rows.npy", "item_vectors.npy"):
                text = text.replace(name, f"../../../{outside.name}/rows.npy")
            path.write_text(text)


# ------------------------------------------------------------------------------ fuzzing


def fuzz(root: pathlib.Path, count: int, rng: random.Random) -> dict:
    from recsys.serve import Recommender, RequestError
    rec = Recommender.load(root / "base" / "artifacts")
    user = rec.artifacts.users.ids[0].item()
    good = {"user_id": user, "k": 5}
    before = rec.recommend_batch([good])[0].items
    other = 0
    examples = []
    for i in range(count):
        fields = ["user_id", "history", "k", "exclude", "exclude_seen", "filters", "time",
                  "ordering", "mmr_lambda", "genre_cap", "temperature", "seed", "colour"]
        req = {f: _hostile(rng, depth=0) for f in rng.sample(fields, rng.randint(0, 4))}
        try:
            if i % 2:
                rec.recommend_batch([req, good] if i % 4 == 1 else [req])
            else:
                rec.recommend(**{k: v for k, v in req.items() if k != "colour"})
        except RequestError:
            pass
        except Exception as e:  # noqa: BLE001 (the count is the measurement)
            other += 1
            if len(examples) < 10:
                examples.append(f"{type(e).__name__}: {e} for {req!r}"[:300])
    after = rec.recommend_batch([good])[0].items
    return {"fuzzed_requests": count, "other_exceptions": other,
            "good_request_unchanged": before == after, "other_exception_examples": examples}


def _hostile(rng: random.Random, depth: int):
    pick = rng.randrange(16)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, rng.randint(-999, 999)])
    if pick == 3:
        return rng.choice([float("nan"), float("inf"), -float("inf"), 1e19, -1e300, 0.5, 1e-320])
    if pick == 4:
        return rng.choice(["", " 1 ", "+1", "01", "１", "1e3", "\x00", "🙂", "a" * 1000, "1"])
    if pick == 5:
        return rng.choice(["topk", "mmr", "explore", "best"])
    if pick in (6, 7) and depth < 2:
        return [_hostile(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    if pick == 8 and depth < 2:
        keys = ["genres_not", "genres_any", "year_min", "year_max", "colour"]
        return {rng.choice(keys): _hostile(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    if pick == 9:
        return rng.choice([1900, 1995, 2**63, -5, 9999, 10000])
    if pick == 10:
        return rng.choice([b"1", bytearray(b"2"), object(), (1, 2), {1, 2}, frozenset()])
    if pick == 11:
        import numpy as np
        return rng.choice([np.int64(1), np.float32("nan"), np.array([1, 2]), np.array(["1"]),
                           np.uint64(2**64 - 1), np.bool_(True)])
    return rng.randint(1, 400)


# ------------------------------------------------------------------------------ publication


def publication(root: pathlib.Path, exports: int) -> dict:
    """Re-exports `exports` times while reader threads load and check the current version."""
    from recsys.serve import artifacts as artifacts_lib
    base = root / "base"
    stop = threading.Event()
    loads, failures, errors = [0], [0], []

    def reader():
        while not stop.is_set():
            try:
                loaded = artifacts_lib.load(base / "artifacts")
                assert loaded.item_vectors.shape[0] > 1
                loads[0] += 1
            except Exception as e:  # noqa: BLE001 (the count is the measurement)
                failures[0] += 1
                if len(errors) < 5:
                    errors.append(f"{type(e).__name__}: {e}"[:300])

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(exports):
        result = recsys("export", "--config", TINY, "--workdir", str(base), sets=BASE_SETS)
        if result.returncode:
            errors.append(f"export {i}: {result.stderr[-300:]}")
        print(f"export {i}: rc {result.returncode}, loads so far {loads[0]}", flush=True)
    stop.set()
    for t in threads:
        t.join()
    return {"publish_exports": exports, "publish_loads": loads[0],
            "publish_failed_loads": failures[0], "publish_errors": errors}


def table(out: dict) -> str:
    rows = [
        ("kill -9 at random moments, then resume",
         f"{out['kill_trials']} runs ({out['kills_during_save']} killed mid-save)",
         f"{out['kill_resumes']} resumed, {out['kill_resumes_exact']} bit-exact"),
        ("truncate / flip / delete each checkpoint and artifact file",
         f"{out['corruption_cases']} cases",
         (f"{out['corruption_refused']} refused with one line, {out['silently_accepted']} "
         f"accepted, {out['tracebacks']} tracebacks")),
        ("malicious bundles (pickle, symlink, path escapes, unlisted file)",
         f"{out['malicious_bundles']} bundles",
         (f"{out['malicious_refused']} refused, {out['code_executions']} code executions, "
         f"{out['outside_reads']} outside reads")),
        ("fuzzed requests", f"{out['fuzzed_requests']} requests",
         f"{out['other_exceptions']} exceptions other than RequestError"),
        ("re-exports while 3 threads load",
         f"{out['publish_exports']} exports, {out['publish_loads']} loads",
         f"{out['publish_failed_loads']} failed loads"),
    ]
    lines = ["| fault | trials | outcome |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--exports", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="recsys-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    out = {"load_avg": os.getloadavg()[0]}
    out.update(corruption_cases(root))
    out.update(malicious_bundles(root))
    out.update(fuzz(root, args.requests, rng))
    out.update(publication(root, args.exports))
    out.update(kill_trials(root, args.kills, rng))
    out["seconds"] = time.time() - t0
    out["load_avg_end"] = os.getloadavg()[0]
    out["provenance"] = provenance.record()
    print(table(out))
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text + "\n")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
