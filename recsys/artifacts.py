"""The artifacts format shared by export (writer) and serve (reader): manifest and checksums."""

from __future__ import annotations

import hashlib
import json
import pathlib

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifacts directory that is missing, partial, corrupt or of another format version."""


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(directory: pathlib.Path) -> dict:
    """Reads the manifest and checks every listed file exists with its checksum."""
    directory = pathlib.Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a recsys artifacts directory: "
                                       f"{MANIFEST} is missing (was the export interrupted?)")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest.get('format_version')} "
                                       f"is not supported (this recsys reads {FORMAT_VERSION})")
    for name, digest in manifest["checksums"].items():
        file = directory / name
        if not file.is_file():
            raise ArtifactError(f"{directory}: {name} is missing")
        if sha256(file) != digest:
            raise ArtifactError(f"{directory}: {name} does not match its checksum "
                                           "in the manifest (corrupt or modified)")
    return manifest
