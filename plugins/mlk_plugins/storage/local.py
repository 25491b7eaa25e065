"""``local``: files in a folder (default ``$MLK_HOME/store``), written atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pydantic import Field

from mlk.sections import StorageConfig
from mlk.storage import Storage


class LocalStorageConfig(StorageConfig):
    path: str | None = Field(None, description="the folder; default $MLK_HOME/store")


class LocalStorage(Storage):
    """A folder on this machine. Each file is written to a temporary name beside its target,
    flushed to disk and renamed into place, so a crash never leaves a partial file under a key."""

    name = "local"
    Config = LocalStorageConfig

    def __init__(self, config: LocalStorageConfig, home: Path) -> None:
        super().__init__(config, home)
        self.root = Path(config.path).expanduser().resolve() if config.path else home / "store"

    def _path(self, key: str) -> Path:
        parts = [p for p in key.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValueError(f"invalid storage key {key!r}")
        return self.root.joinpath(*parts)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def put_file(self, src: Path, key: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(f"{self.uri(key)} does not exist")
        shutil.copyfile(src, dest)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix.strip("/")]
        if not base.is_dir():
            return []
        return sorted(
            f"{prefix.strip('/')}/{p.relative_to(base).as_posix()}"
            for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")
        )
