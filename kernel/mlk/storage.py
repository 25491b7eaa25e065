"""The storage contract (``mlk.storage``) and the checkpoint transfer built on it.

A storage plugin moves single files between this machine and its place (a folder, a bucket)
under slash-separated keys. The kernel builds checkpoints and artifacts on top: it hashes every
file, uploads them, writes the manifest last (so a half-written checkpoint is never listed), and
verifies every sha256 on the way back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

from mlk.errors import MlkError
from mlk.plugin import Plugin
from mlk.sections import StorageConfig

MANIFEST = "MANIFEST.json"


class ChecksumError(MlkError):
    """A stored file does not match the checksum recorded when it was written."""


class Storage(Plugin):
    """Base class of storage plugins. ``home`` is ``MLK_HOME``, for plugins that default under it."""

    Config: ClassVar[type[StorageConfig]] = StorageConfig

    def __init__(self, config: StorageConfig, home: Path) -> None:
        self.config = config
        self.home = home

    def uri(self, key: str) -> str:
        """Where ``key`` lives, as a URI a person can read (``file:///...``, ``s3://...``)."""
        raise NotImplementedError

    def put_file(self, src: Path, key: str) -> None:
        """Store the local file ``src`` under ``key``, atomically: readers see all of it or none."""
        raise NotImplementedError

    def get_file(self, key: str, dest: Path) -> None:
        """Copy ``key`` to the local path ``dest``; raise FileNotFoundError when absent."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under ``prefix`` (a folder-like key); absent keys are not an error."""
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, sorted."""
        raise NotImplementedError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def put_dir(storage: Storage, src: Path, prefix: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Upload every file below ``src`` under ``prefix``; return the manifest (written last)."""
    files = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        storage.put_file(path, f"{prefix}/{rel}")
    manifest = {"files": files, "meta": meta or {}}
    tmp = src.parent / f".{src.name}.manifest.json"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    try:
        storage.put_file(tmp, f"{prefix}/{MANIFEST}")
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def get_dir(storage: Storage, prefix: str, manifest: dict[str, Any], dest: Path) -> None:
    """Download what :func:`put_dir` stored into ``dest``, verifying every checksum."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel, info in manifest["files"].items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.get_file(f"{prefix}/{rel}", target)
        got = sha256_file(target)
        if got != info["sha256"]:
            raise ChecksumError(
                f"{storage.uri(prefix + '/' + rel)}: sha256 {got[:12]}... does not match the recorded "
                f"{info['sha256'][:12]}...; the file was changed or corrupted after it was written"
            )
