"""Conformance suite of storage plugins (``mlk.storage``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from mlk.registry import registry
from mlk.storage import ChecksumError, Storage, get_dir, put_dir


class StorageContract:
    """Subclass, set ``plugin``, and override :meth:`config` to point the store at ``tmp_path``."""

    plugin: ClassVar[str] = ""

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return {"name": self.plugin, "path": str(tmp_path / "store")}

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Storage:
        cls = registry().get("storage", self.plugin, where="storage.name")
        return cls(cls.Config.model_validate(self.config(tmp_path)), tmp_path)  # type: ignore[no-any-return]

    def test_registered_class(self) -> None:
        cls = registry().get("storage", self.plugin, where="storage.name")
        assert issubclass(cls, Storage) and cls.name == self.plugin and cls.__doc__

    def test_put_get_round_trip(self, storage: Storage, tmp_path: Path) -> None:
        src = tmp_path / "src.bin"
        src.write_bytes(bytes(range(256)) * 100)
        storage.put_file(src, "a/b/c.bin")
        assert storage.exists("a/b/c.bin")
        dest = tmp_path / "dest.bin"
        storage.get_file("a/b/c.bin", dest)
        assert dest.read_bytes() == src.read_bytes()
        assert storage.uri("a/b/c.bin")

    def test_overwrite_replaces(self, storage: Storage, tmp_path: Path) -> None:
        src = tmp_path / "f"
        for payload in (b"first", b"second, longer"):
            src.write_bytes(payload)
            storage.put_file(src, "k/f")
        storage.get_file("k/f", tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == b"second, longer"

    def test_missing_key(self, storage: Storage, tmp_path: Path) -> None:
        assert not storage.exists("nope/x")
        with pytest.raises(FileNotFoundError):
            storage.get_file("nope/x", tmp_path / "x")

    def test_list_and_delete_prefix(self, storage: Storage, tmp_path: Path) -> None:
        src = tmp_path / "f"
        src.write_text("x")
        for key in ("p/1", "p/q/2", "other/3"):
            storage.put_file(src, key)
        assert storage.list("p") == ["p/1", "p/q/2"]
        storage.delete_prefix("p")
        assert storage.list("p") == [] and storage.exists("other/3")
        storage.delete_prefix("never/was")

    def test_directory_checksums_detect_corruption(self, storage: Storage, tmp_path: Path) -> None:
        src = tmp_path / "ckpt"
        (src / "sub").mkdir(parents=True)
        (src / "w.bin").write_bytes(b"\x00" * 1000)
        (src / "sub" / "meta.json").write_text("{}")
        manifest = put_dir(storage, src, "runs/r/ckpt-1", {"epoch": 1})
        assert set(manifest["files"]) == {"w.bin", "sub/meta.json"}
        assert storage.exists("runs/r/ckpt-1/MANIFEST.json")
        get_dir(storage, "runs/r/ckpt-1", manifest, tmp_path / "back")
        assert (tmp_path / "back" / "w.bin").read_bytes() == b"\x00" * 1000
        bad = tmp_path / "bad.bin"
        bad.write_bytes(b"\x01" * 1000)
        storage.put_file(bad, "runs/r/ckpt-1/w.bin")
        with pytest.raises(ChecksumError):
            get_dir(storage, "runs/r/ckpt-1", manifest, tmp_path / "again")
