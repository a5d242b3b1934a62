"""What a benchmark figure was measured with: the resolved config, the package source, the commit.

A finished run is reused only when both its resolved configuration (the config file after
overrides, as canonical JSON) and the hash of the `recsys` sources match: editing the config
file, an override or any module of the package makes the run count as not done.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

from recsys import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def source_sha256(package: pathlib.Path = ROOT / "recsys") -> str:
    """sha256 over the package's *.py files, sorted by path (each file's path, then its bytes)."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py"), key=lambda p: p.relative_to(package).as_posix()):
        h.update(path.relative_to(package).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def canonical_config(cfg: config_lib.Config) -> str:
    """The resolved config as canonical JSON (sorted keys, no spaces): equal configs, equal text."""
    return json.dumps(config_lib.to_dict(cfg), sort_keys=True, separators=(",", ":"))


def config_sha256(cfg: config_lib.Config) -> str:
    return hashlib.sha256(canonical_config(cfg).encode()).hexdigest()


def run_key(cfg: config_lib.Config, source: str) -> dict:
    """What identifies a run: reuse one only when this is equal."""
    return {"config_sha256": config_sha256(cfg), "source_sha256": source}


def same_run(record: dict, key: dict) -> bool:
    return all(record.get(k) == v for k, v in key.items())


def git_state() -> dict:
    """The checkout's commit and whether tracked files differ from it (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                 check=False, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def record() -> dict:
    """Provenance of a benchmark's JSON: command, commit, source hash, machine load."""
    return {"command": " ".join(["python", "-m", _module_name(), *sys.argv[1:]]),
            "git": git_state(), "source_sha256": source_sha256(),
            "load_average": list(os.getloadavg()), "cpus": os.cpu_count()}


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else sys.argv[0]


def emit(result: dict, path: str | os.PathLike | None) -> None:
    """Prints a benchmark's JSON result and writes it to `path` too (when given)."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(path).write_text(text + "\n")
