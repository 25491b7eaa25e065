"""The compiler contract (``mlk.compilers``): turn a model artifact of one format into another.

An artifact is a folder of files in one *format* (``torch``, ``onnx``, ``onnxruntime``, ``tvm``,
``tflite``, ``coreml``, ``tensorrt`` ...) plus facts about it (:class:`Artifact`). A compiler
declares the formats it ``accepts`` and the one it ``produces``; the kernel chains compile steps
by format and inserts missing ones, so ``compile: [{name: tvm}]`` gets an ``onnx`` step in front.
Optimisation passes (batch-norm folding, pruning, distillation) are compilers from ``torch`` to
``torch``. Every compiler can also *run* what it produced (:meth:`Compiler.runner`), which is how
each artifact is validated; where that is impossible here (CoreML needs macOS, TensorRT an NVIDIA
GPU) it raises :class:`Unavailable` and the validation report says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from mlk.errors import MlkError
from mlk.plugin import Plugin

META_FILE = "artifact.json"

#: A loaded artifact: a batch of inputs (numpy, float32, batch first) to the model's outputs (logits).
Runner = Callable[[Any], Any]


class Unavailable(MlkError):
    """This artifact cannot be built or run on this machine (and why); not a failure of the model."""


@dataclass
class Artifact:
    """A model in one format.

    Attributes:
        format: the format name.
        path: a folder holding the artifact's files.
        meta: facts every step passes on and adds to: ``input_name``, ``input_shape`` (one example,
            no batch axis), ``dtype``, ``num_classes``, ``layout``, ``file`` (the main file, relative
            to ``path``), ``steps`` (the compile steps so far), ``batch_size`` (a fixed batch axis, or
            absent/None when any batch works).
    """

    format: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def file(self) -> Path:
        return self.path / self.meta.get("file", "")

    def save_meta(self) -> None:
        (self.path / META_FILE).write_text(json.dumps({"format": self.format, "meta": self.meta}, indent=1,
                                                      sort_keys=True, default=str))

    @classmethod
    def load(cls, path: Path) -> Artifact:
        data = json.loads((path / META_FILE).read_text())
        return cls(data["format"], path, data["meta"])

    def derive(self, fmt: str, path: Path, step: str, **meta: Any) -> Artifact:
        """A new artifact in ``fmt`` at ``path`` that inherits this one's facts."""
        steps = [*self.meta.get("steps", []), step]
        return Artifact(fmt, path, {**self.meta, **meta, "steps": steps})


@dataclass
class CompileInputs:
    """What a compile step may use besides its source artifact.

    Attributes:
        calibration: inputs from the training split (numpy, batch first), for static quantisation.
        data: the dataset's :class:`mlk.datasets.DataSplits` (passes that fine-tune or distil).
        threads: CPU threads the step may use.
        seed: a seed for anything random in the step.
        context: the best trial's :class:`mlk.trial.TrialContext` (its hyperparameters, sections,
            checkpoints), for steps that rebuild or train the framework model.
        report: takes one line of progress for people (the run prints it, prefixed with the step's
            id); a step that works for minutes should call it every minute or so. Silent by default.
    """

    calibration: Any
    data: Any
    threads: int
    seed: int
    context: Any = None
    report: Callable[[str], None] = field(default=lambda line: None, repr=False)


class CompileConfig(BaseModel):
    """One entry of ``compile:``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="which plugin of the mlk.compilers group")
    id: str | None = Field(None, description="the step's id (default: its name); needed to use a compiler twice")
    input: str | None = Field(None, description="id of the step whose artifact to take (default: the latest "
                                                "earlier artifact of an accepted format)")


class Compiler(Plugin):
    """Base class of compilers and optimisation passes (entry-point group ``mlk.compilers``)."""

    Config: ClassVar[type[CompileConfig]] = CompileConfig
    accepts: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[str] = ""

    def __init__(self, config: CompileConfig) -> None:
        self.config = config

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this compiler cannot work on this machine, or None when it can. The default names missing
        requirements and the install command; hardware-bound compilers say what hardware is missing."""
        missing = cls.missing_requirements()
        if not missing:
            return None
        return f"{cls.name} needs {', '.join(missing)}, which is not installed here; {cls.install_hint()}"

    def describe(self, source_format: str) -> str:
        """One line for ``mlk graph``: what this step would do to a ``source_format`` artifact."""
        return f"{self.name}: {source_format} -> {self.produces}"

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        """Build the artifact into the empty folder ``out`` and return it (``source.derive(...)``)."""
        raise NotImplementedError

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        """Load ``artifact`` (of format ``produces``) for inference; raise :class:`Unavailable` when it
        cannot run here."""
        raise NotImplementedError
