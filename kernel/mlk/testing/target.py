"""Conformance suite of deploy targets (``mlk.targets``): a real bundle built from real artifacts, its
manifest's checksums verified, and its acceptance check run on real data.

Every bundle holds ``manifest.json`` with ``files``: each file's relative path mapped to its
``sha256`` and ``size`` (:func:`mlk.target.checksums` writes that). The suite builds the bundle
once per class and checks it from copies, so a test that damages a file cannot affect another.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mlk.compiler import Artifact
from mlk.errors import UserError
from mlk.registry import registry
from mlk.target import MANIFEST, BundleRefused, DeployConfig, DeployInputs, Target, verify_checksums


class TargetContract:
    """Subclass, set ``plugin`` (and ``config``), and implement :meth:`artifacts`, which returns real
    artifacts (format -> :class:`Artifact`, formats the target accepts, each with
    ``meta["validation"]`` as the kernel sets it) and the :class:`DeployInputs` of a real dataset.

    ``checks_checksums``: the target's ``check`` refuses a bundle whose files differ from its
    manifest. ``serves``: the target runs a server (``serve``); others must refuse to.
    """

    plugin: ClassVar[str] = ""
    config: ClassVar[dict[str, Any]] = {}
    checks_checksums: ClassVar[bool] = True
    serves: ClassVar[bool] = False

    def artifacts(self, tmp_path: Path) -> tuple[dict[str, Artifact], DeployInputs]:
        raise NotImplementedError

    def target(self) -> Target:
        cls = registry().get("targets", self.plugin, where="deploy.name")
        return cls(cls.Config.model_validate({"name": self.plugin, **self.config}))  # type: ignore[no-any-return]

    @pytest.fixture(scope="class")
    @classmethod
    def built(cls, tmp_path_factory: pytest.TempPathFactory) -> tuple[Artifact, DeployInputs]:
        """The bundle, built once per class, and the inputs it was built with."""
        suite = cls()
        tmp = tmp_path_factory.mktemp(f"target-{cls.plugin}")
        artifacts, inputs = suite.artifacts(tmp)
        out = tmp / "bundle"
        out.mkdir()
        bundle = suite.target().build(artifacts, out, inputs)
        return bundle, inputs

    @staticmethod
    def copy_of(bundle: Artifact, dest: Path) -> Artifact:
        """The bundle copied to ``dest`` (tests that change files work on a copy)."""
        shutil.copytree(bundle.path, dest)
        return Artifact(bundle.format, dest, json.loads(json.dumps(bundle.meta, default=str)))

    def test_registered_class(self) -> None:
        cls = registry().get("targets", self.plugin, where="deploy.name")
        assert issubclass(cls, Target) and cls.name == self.plugin and cls.__doc__
        assert cls.accepts and issubclass(cls.Config, DeployConfig)
        assert set(cls.accepts_unvalidated) <= set(cls.accepts)
        for name, field in cls.Config.model_fields.items():
            assert field.description, f"{self.plugin}: Config field '{name}' has no description"

    def test_bundle_format_and_meta(self, built: tuple[Artifact, DeployInputs]) -> None:
        bundle, _ = built
        assert bundle.format == f"bundle.{self.plugin}"
        json.dumps(bundle.meta)  # stored in the registry as JSON

    def test_manifest_lists_every_file_with_its_checksum(self, built: tuple[Artifact, DeployInputs]) -> None:
        bundle, _ = built
        manifest = json.loads((bundle.path / MANIFEST).read_text())
        assert manifest["files"], "the manifest lists no files"
        assert verify_checksums(bundle.path, manifest["files"]) == []
        for rel, facts in manifest["files"].items():
            assert (bundle.path / rel).stat().st_size == facts["size"], rel

    def test_checksums_catch_a_changed_file(self, built: tuple[Artifact, DeployInputs], tmp_path: Path) -> None:
        bundle = self.copy_of(built[0], tmp_path / "copy")
        manifest = json.loads((bundle.path / MANIFEST).read_text())
        victim = max(manifest["files"], key=lambda rel: manifest["files"][rel]["size"])
        path = bundle.path / victim
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        problems = verify_checksums(bundle.path, manifest["files"])
        assert problems and victim in problems[0]
        if self.checks_checksums:
            with pytest.raises(BundleRefused):
                self.target().check(bundle, built[1])

    def test_check_passes_on_the_real_artifacts(self, built: tuple[Artifact, DeployInputs]) -> None:
        bundle, inputs = built
        report = self.target().check(bundle, inputs)
        assert isinstance(report, dict)
        json.dumps(report)
        if report.get("ran"):
            assert report["accuracy"] > 0.5, report

    def test_serve(self, built: tuple[Artifact, DeployInputs], tmp_path: Path) -> None:
        if self.serves:
            pytest.skip("serving targets are tested with a real server and client")
        with pytest.raises(UserError):
            self.target().serve("m", home=tmp_path, host="127.0.0.1", port=1, token=None)
