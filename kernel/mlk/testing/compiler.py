"""Conformance suite of compilers (``mlk.compilers``): a real compile of a real model, then the
artifact's runner checked against the reference on real inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mlk.compiler import Artifact, CompileConfig, CompileInputs, Compiler, Unavailable
from mlk.registry import registry


class CompilerContract:
    """Subclass, set ``plugin`` (and ``config``), and implement :meth:`source`, which returns a source
    artifact in a format the compiler accepts, a reference runner, and labelled inputs.

    ``max_diff`` bounds the largest output difference from the reference, ``min_agreement`` the
    share of equal top-1 predictions. A compiler that cannot work on this machine sets
    ``unavailable_here`` to the reason; the suite then checks it says so with :class:`Unavailable`.
    """

    plugin: ClassVar[str] = ""
    config: ClassVar[dict[str, Any]] = {}
    max_diff: ClassVar[float] = 1e-4
    min_agreement: ClassVar[float] = 0.99
    unavailable_here: ClassVar[str | None] = None

    def source(self, tmp_path: Path) -> tuple[Artifact, Any, Any, Any]:
        """``(artifact, reference_runner, inputs, labels)``; inputs are a float32 numpy batch."""
        raise NotImplementedError

    def compiled_inputs(self) -> CompileInputs | None:
        """What the compile step gets besides its source (default: the inputs as calibration data)."""
        return None

    def compiler(self) -> Compiler:
        cls = registry().get("compilers", self.plugin, where="compile.name")
        return cls(cls.Config.model_validate({"name": self.plugin, **self.config}))  # type: ignore[no-any-return]

    @pytest.fixture
    def compiled(self, tmp_path: Path) -> tuple[Artifact, Any, Any, Any]:
        source, reference, x, y = self.source(tmp_path)
        out = tmp_path / "out"
        out.mkdir()
        compiler = self.compiler()
        inputs = self.compiled_inputs() or CompileInputs(calibration=x[:128], data=None, threads=1, seed=0)
        if self.unavailable_here:
            with pytest.raises(Unavailable) as info:
                artifact = compiler.compile(source, out, inputs)
                compiler.runner(artifact, 1)
            assert len(str(info.value)) > 20, "Unavailable should say why"
            return source, reference, x, None
        artifact = compiler.compile(source, out, inputs)
        return artifact, reference, x, y

    def test_registered_class(self) -> None:
        cls = registry().get("compilers", self.plugin, where="compile.name")
        assert issubclass(cls, Compiler) and cls.name == self.plugin and cls.__doc__
        assert cls.accepts and cls.produces and issubclass(cls.Config, CompileConfig)
        for name, field in cls.Config.model_fields.items():
            assert field.description, f"{self.plugin}: Config field '{name}' has no description"

    def test_artifact_is_complete(self, compiled: tuple[Artifact, Any, Any, Any]) -> None:
        artifact, *_ = compiled
        if self.unavailable_here:
            return
        assert artifact.format == self.compiler().produces
        assert artifact.file.exists(), f"{artifact.file} was not written"
        assert Artifact.load(artifact.path).meta == json.loads(json.dumps(artifact.meta, default=str))
        assert artifact.meta["steps"][-1]

    def test_runner_matches_the_reference(self, compiled: tuple[Artifact, Any, Any, Any]) -> None:
        artifact, reference, x, _labels = compiled
        if self.unavailable_here:
            return
        run = self.compiler().runner(artifact, 1)
        import numpy as np

        for size in (1, 7, 64):
            got, want = run(x[:size]), reference(x[:size])
            assert got.shape == want.shape, (size, got.shape, want.shape)
        got, want = run(x), reference(x)
        diff = float(np.abs(got - want).max())
        agreement = float((got.argmax(1) == want.argmax(1)).mean())
        assert diff <= self.max_diff, f"max abs difference {diff:.3g} > {self.max_diff:.3g}"
        assert agreement >= self.min_agreement, f"top-1 agreement {agreement:.3f} < {self.min_agreement}"
