"""The artifacts format, shared by export (writer) and serve (reader): names, seal, versions.

An artifacts root holds sealed bundles side by side and a pointer to the published one:

  ROOT/current              symlink -> versions/<id>, replaced atomically (rename of a new link)
  ROOT/versions/<id>/       one sealed bundle per export; <id> sorts by creation time
  ROOT/versions/<id>.tmp/   a bundle being written (never pointed at)

A bundle is sealed: its manifest lists every file in it with size and sha256, and `verify`
refuses unlisted, missing or changed files, symlinks, non-regular files and listed paths that
are absolute or leave the bundle, before anything in it is deserialised. Only paths inside the
bundle are ever looked at. Readers hold a shared flock on the version they load (taken under a
shared lock of versions/, which the collector holds exclusively while it picks what to remove)
and the collector skips locked versions, so a load never sees its version deleted underneath it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator

import numpy as np

FORMAT_VERSION = 2  # 2: sealed bundles (size + sha256 of every file), versions under a root

# Root layout.
ROOT = "artifacts"  # the root's name inside a workdir: WORKDIR/artifacts
CURRENT = "current"
VERSIONS = "versions"
STAGING_SUFFIX = ".tmp"
KEEP_VERSIONS = 3  # default versions kept per root (the current one is always kept)

# Bundle layout (see recsys.export for what each holds).
MANIFEST = "manifest.json"
ITEM_IDS = "item_ids.npy"
USER_IDS = "user_ids.npy"
ITEM_VECTORS = "item_vectors.npy"
ITEM_FEATURES = "item_features.npz"
USERS = "users.npz"
QUERY_TOWER = "query_tower.jax"
QUERY_PARAMS = "query_params.npz"
RANKER = "ranker.jax"
RANKER_PARAMS = "ranker_params.npz"
INDEX_DIR = "index"

SEAL_FIELDS = ("format_version", "recsys_version", "created_at", "checksums")  # set by `seal`
MAX_MANIFEST_BYTES = 64 << 20
_VERSION_ID = re.compile(r"[0-9]{8}T[0-9]{12}Z-[0-9a-f]{6}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ArtifactError(ValueError):
    """An artifacts directory that is missing, partial, corrupt, unsafe or of another format."""


def recsys_version() -> str:
    try:
        return importlib.metadata.version("recsys")
    except importlib.metadata.PackageNotFoundError:  # a source checkout that is not installed
        return "unknown"


# ---- reading -------------------------------------------------------------------------------


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields the version directory to read, locked (shared) until the block ends.

    `path` is an artifacts root (or its `current` link), whose pointer is read once, or a version
    directory itself. Garbage collection never removes a locked version, and it cannot run
    between reading the pointer and locking the version it names.
    """
    path = pathlib.Path(path)
    mode = _lstat(path, "artifacts directory").st_mode
    if stat.S_ISLNK(mode) and path.name == CURRENT:
        path, mode = path.parent, stat.S_IFDIR
    if stat.S_ISLNK(mode):
        raise ArtifactError(f"{path} is a symlink: pass the artifacts root or a version directory")
    if not stat.S_ISDIR(mode):
        raise ArtifactError(f"{path} is not a directory")
    if _is_root(path):
        with _locked(path / VERSIONS, fcntl.LOCK_SH):  # the collector takes it exclusively
            version = _pointed(path)
            fd = _lock_dir(version, fcntl.LOCK_SH)
    else:
        version, fd = path, _lock_dir(path, fcntl.LOCK_SH)
    try:
        if os.fstat(fd).st_nlink == 0:
            raise ArtifactError(f"{version} was garbage-collected (not current any more)")
        yield version
    finally:
        os.close(fd)


def published(root: str | os.PathLike) -> pathlib.Path | None:
    """The version an artifacts root's `current` names, or None when nothing is published."""
    root = pathlib.Path(root)
    return _pointed(root) if os.path.lexists(root / CURRENT) else None


def verify(directory: str | os.PathLike) -> dict:
    """The manifest of a sealed bundle, after checking every file in it; ArtifactError otherwise."""
    directory = pathlib.Path(directory)
    mode = _lstat(directory, "artifacts directory").st_mode
    if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
        raise ArtifactError(f"{directory} is a symlink or not a directory: a bundle is a real one")
    manifest = read_manifest(directory)
    listed = manifest["checksums"]
    found = _files(directory)
    found.pop(MANIFEST, None)
    unlisted = sorted(set(found) - set(listed))
    if unlisted:
        raise ArtifactError(f"{directory}: {unlisted[0]} is not listed in {MANIFEST} "
                            "(a sealed bundle holds only the files its manifest lists)")
    for name in sorted(listed):
        if name not in found:
            raise ArtifactError(f"{directory}: {name} is missing")
        if (found[name].st_size != listed[name]["size"]
                or sha256(directory / name) != listed[name]["sha256"]):
            raise ArtifactError(f"{directory}: {name} does not match its size and sha256 in "
                                f"{MANIFEST} (corrupt or modified)")
    return manifest


def read_manifest(directory: pathlib.Path) -> dict:
    """The parsed manifest, checked for format and well-formed entries (files are not read)."""
    path = pathlib.Path(directory) / MANIFEST
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{directory} is not a recsys artifacts directory: {MANIFEST} is "
                            "missing (was the export interrupted?)") from None
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{path} is a symlink or not a regular file")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path}: {st.st_size} bytes, above the {MAX_MANIFEST_BYTES} allowed")
    with _open_file(path) as f:
        raw = f.read()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: not UTF-8 text (byte {e.start}); corrupt") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); truncated or corrupt") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: a JSON {type(manifest).__name__}, not an object")
    written = manifest.get("format_version")
    if written != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {written!r} (written by recsys "
            f"{manifest.get('recsys_version', 'unknown')}) is not supported: this recsys "
            f"{recsys_version()} reads format_version {FORMAT_VERSION}; re-export the artifacts")
    checksums = manifest.get("checksums")
    if not isinstance(checksums, dict):
        raise ArtifactError(f"{path}: 'checksums' must be an object of path -> size, sha256")
    for name, entry in checksums.items():
        _check_listed_name(path, name)
        if not (isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            raise ArtifactError(f"{path}: the entry of {name} must be {{size, sha256}}, "
                                f"got {entry!r}")
    return manifest


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with _open_file(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- writing -------------------------------------------------------------------------------


def publish(root: str | os.PathLike, write: Callable[[pathlib.Path], dict], *,
            keep_versions: int = KEEP_VERSIONS) -> pathlib.Path:
    """Writes a new version and makes it current; returns its directory.

    `write(staging_dir)` fills an empty directory and returns the manifest fields. The directory
    is then sealed, renamed to versions/<id> and `current` switched to it in one rename; versions
    beyond the newest `keep_versions` that are neither current nor being read are removed.
    """
    if keep_versions < 1:
        raise ValueError(f"keep_versions={keep_versions}: must be >= 1")
    root = pathlib.Path(root)
    if os.path.lexists(root / MANIFEST):
        raise ArtifactError(f"{root} is a bundle ({MANIFEST} at its top), not an artifacts root: "
                            "export to another directory (or move the old bundle away)")
    versions = root / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(versions).st_mode):
        raise ArtifactError(f"{versions} is a symlink or not a directory")
    version_id = (f"{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S%fZ}-"
                  f"{secrets.token_hex(3)}")
    staging = versions / (version_id + STAGING_SUFFIX)
    with _locked(versions, fcntl.LOCK_SH):  # the collector never sees it unlocked
        staging.mkdir()
        fd = _lock_dir(staging, fcntl.LOCK_EX)  # garbage collection skips it while written
    try:
        seal(staging, write(staging))
        version = versions / version_id
        staging.rename(version)
        _fsync_dir(versions)
        link = root / f".{CURRENT}-{secrets.token_hex(4)}{STAGING_SUFFIX}"
        os.symlink(f"{VERSIONS}/{version_id}", link)
        os.replace(link, root / CURRENT)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(fd)
    collect_garbage(root, keep_versions)
    return version


def seal(directory: pathlib.Path, fields: dict) -> dict:
    """Writes the manifest: `fields` plus format, versions and size + sha256 of every file."""
    directory = pathlib.Path(directory)
    files = _files(directory)
    files.pop(MANIFEST, None)
    manifest = {"format_version": FORMAT_VERSION, "recsys_version": recsys_version(),
                "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
                **{k: v for k, v in fields.items() if k not in SEAL_FIELDS},
                "checksums": {name: {"size": st.st_size, "sha256": sha256(directory / name)}
                              for name, st in sorted(files.items())}}
    for name in files:  # durable before the version is published
        with _open_file(directory / name) as f:
            os.fsync(f.fileno())
    with open(directory / MANIFEST, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=2, default=_json_default))
        f.flush()
        os.fsync(f.fileno())
    return manifest


def root_of(version: pathlib.Path) -> pathlib.Path:
    """The artifacts root a version directory (ROOT/versions/<id>) belongs to."""
    version = pathlib.Path(version)
    root = version.parent.parent
    if version.parent.name != VERSIONS or not _VERSION_ID.fullmatch(version.name) \
            or not _is_root(root):
        raise ArtifactError(f"{version} is not a version of an artifacts root "
                            f"(ROOT/{VERSIONS}/<id> beside ROOT/{CURRENT})")
    return root


def collect_garbage(root: pathlib.Path, keep_versions: int) -> list[str]:
    """Removes versions beyond the newest `keep_versions`, except the current one and any being
    read or written (locked); returns the names removed."""
    root = pathlib.Path(root)
    victims = []
    with _locked(root / VERSIONS, fcntl.LOCK_EX):  # no reader is between pointer and lock
        current = published(root)
        names = sorted(os.listdir(root / VERSIONS))
        complete = [n for n in names if _VERSION_ID.fullmatch(n)]
        keep = set(complete[-keep_versions:]) | ({current.name} if current else set())
        for name in names:
            ours = _VERSION_ID.fullmatch(name.removesuffix(STAGING_SUFFIX))
            if ours and name not in keep:
                try:
                    victims.append((name, _lock_dir(root / VERSIONS / name,
                                                    fcntl.LOCK_EX | fcntl.LOCK_NB)))
                except (BlockingIOError, ArtifactError):  # being read or written (a later
                    pass  # collection removes it), gone, or not a directory of ours
    for name, fd in victims:
        try:
            shutil.rmtree(root / VERSIONS / name)
        finally:
            os.close(fd)
    return [name for name, _ in victims]


# ---- helpers -------------------------------------------------------------------------------


def _is_root(path: pathlib.Path) -> bool:
    return os.path.lexists(path / CURRENT) or os.path.lexists(path / VERSIONS)


def _pointed(root: pathlib.Path) -> pathlib.Path:
    link = root / CURRENT
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        raise ArtifactError(f"{root}: no published version ({CURRENT} is missing; was the "
                            "export interrupted?)") from None
    except OSError:
        raise ArtifactError(f"{link} is not a symlink to {VERSIONS}/<id>") from None
    parts = target.split("/")
    if len(parts) != 2 or parts[0] != VERSIONS or not _VERSION_ID.fullmatch(parts[1]):
        raise ArtifactError(f"{link} points to {target!r}, not to {VERSIONS}/<id> inside {root}")
    if not stat.S_ISDIR(_lstat(root / VERSIONS, "versions directory").st_mode):
        raise ArtifactError(f"{root / VERSIONS} is a symlink or not a directory")
    return root / VERSIONS / parts[1]


def _files(directory: pathlib.Path) -> dict[str, os.stat_result]:
    """Every regular file under `directory` by relative POSIX path (symlinks are not followed:
    one anywhere, or any other non-regular entry, is refused)."""
    found, pending = {}, [("", directory)]
    while pending:
        prefix, path = pending.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                name = prefix + entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    raise ArtifactError(f"{directory}: {name} is a symlink (a sealed bundle "
                                        "holds only regular files and directories)")
                if stat.S_ISDIR(mode):
                    pending.append((name + "/", pathlib.Path(entry.path)))
                elif stat.S_ISREG(mode):
                    found[name] = entry.stat(follow_symlinks=False)
                else:
                    raise ArtifactError(f"{directory}: {name} is not a regular file")
    return found


def _check_listed_name(manifest_path: pathlib.Path, name: str) -> None:
    """A listed name must be a relative POSIX path inside the bundle (checked before any stat)."""
    if (name.startswith("/") or "\\" in name or "\0" in name or name == MANIFEST
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise ArtifactError(f"{manifest_path}: lists {name!r}, which is not a relative path "
                            "inside the bundle (absolute, '..', or the manifest itself)")


def _lstat(path: pathlib.Path, what: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{what} not found: {path}") from None


def _lock_dir(path: pathlib.Path, how: int) -> int:
    """An open descriptor of directory `path` (never through a symlink), flock'ed `how`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ArtifactError(f"artifacts directory not found: {path}") from None
    except OSError:
        raise ArtifactError(f"{path} is a symlink or not a directory") from None
    try:
        fcntl.flock(fd, how)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _locked(path: pathlib.Path, how: int) -> Iterator[None]:
    fd = _lock_dir(path, how)
    try:
        yield
    finally:
        os.close(fd)


def _open_file(path: pathlib.Path):
    """Opens a regular file for reading without following a symlink."""
    try:
        return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")
    except OSError as e:
        raise ArtifactError(f"cannot open {path} ({e.strerror}; a symlink?)") from None


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
