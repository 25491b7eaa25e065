"""``flatdir``: every key a single file in one folder, its name the key with '/' as '__'."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pydantic import Field

from mlk.sections import StorageConfig
from mlk.storage import Storage


class FlatDirConfig(StorageConfig):
    folder: str | None = Field(None, description="where the files go; default $MLK_HOME/flat")


class FlatDirStorage(Storage):
    """Keys flattened into one folder; writes go through a temporary file and a rename."""

    name = "flatdir"
    Config = FlatDirConfig

    def __init__(self, config: FlatDirConfig, home: Path) -> None:
        super().__init__(config, home)
        self.root = Path(config.folder) if config.folder else home / "flat"
        self.root.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        return self.root / key.strip("/").replace("/", "__")

    def uri(self, key: str) -> str:
        return self._file(key).as_uri()

    def put_file(self, src: Path, key: str) -> None:
        tmp = self._file(key).with_suffix(".partial")
        shutil.copyfile(src, tmp)
        os.replace(tmp, self._file(key))

    def get_file(self, key: str, dest: Path) -> None:
        if not self._file(key).is_file():
            raise FileNotFoundError(key)
        shutil.copyfile(self._file(key), dest)

    def exists(self, key: str) -> bool:
        return self._file(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self._file(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        flat = prefix.strip("/").replace("/", "__")
        names = [p.name for p in self.root.iterdir() if not p.name.endswith(".partial")]
        keys = [n.replace("__", "/") for n in names if n == flat or n.startswith(flat + "__")]
        return sorted(keys)
