"""Optimisation passes on the trained torch model, as compile steps from ``torch`` to ``torch``:
``fold_bn``, ``prune`` and ``distill``. The work is in :mod:`mlk_plugins.compilers.passes`; these
classes load the artifact's module, apply the pass, and write a new torch artifact whose meta
carries the pass's report (what changed, parameters, size and latency before and after)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from mlk.compiler import Artifact, CompileConfig, CompileInputs, Compiler
from mlk.errors import UserError


class _TorchPass(Compiler):
    accepts: ClassVar[tuple[str, ...]] = ("torch",)
    produces: ClassVar[str] = "torch"
    requires = ("torch", "safetensors")
    extra = "torch"

    def _example(self, source: Artifact, inputs: CompileInputs) -> Any:
        import torch

        if inputs.calibration is not None:
            return torch.as_tensor(inputs.calibration[:8])
        return torch.zeros((8, *source.meta["input_shape"]))

    def _write(self, module: Any, source: Artifact, out: Path, step: str, report: dict[str, Any]) -> Artifact:
        from mlk_plugins.frameworks.torch.artifacts import rebuild_recipe, write_artifact

        artifact = write_artifact(module, out, source, source.meta, rebuild_recipe(source), step)
        artifact.meta.setdefault("passes", []).append({"pass": self.name, **report})
        artifact.save_meta()
        return artifact

    def runner(self, artifact: Artifact, threads: int) -> Any:
        from mlk_plugins.frameworks.torch.artifacts import runner

        return runner(artifact, threads)

    def _data(self, inputs: CompileInputs) -> Any:
        if inputs.data is None:
            raise UserError(f"{self.name} trains, so the spec needs a `data` section", where="compile")
        return inputs.data


class FoldBatchNorm(_TorchPass):
    """Folds every batch norm that follows a convolution or dense layer into that layer."""

    name = "fold_bn"

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        import torch

        from mlk_plugins.compilers.passes import fold_batchnorm
        from mlk_plugins.frameworks.torch.artifacts import load_module

        torch.set_num_threads(inputs.threads)
        folded, report = fold_batchnorm(load_module(source), self._example(source, inputs))
        return self._write(folded, source, out, f"fold_bn ({report.get('pairs_folded', 0)} pairs)", report)


class PruneConfig(CompileConfig):
    amount: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of weights (or channels) removed")
    structured: bool = Field(False, description="remove whole output channels (smaller and faster) instead of "
                                                "zeroing single weights")
    scope: Literal["layer", "global"] = Field("layer", description="unstructured: rank weights per layer or "
                                                                   "across the model")
    finetune_epochs: int = Field(2, ge=0, description="epochs of fine-tuning after pruning")
    lr: float = Field(1e-3, gt=0.0, description="fine-tuning learning rate")
    batch_size: int = Field(64, ge=1, description="fine-tuning batch size")


class Prune(_TorchPass):
    """Magnitude pruning (unstructured or by channel) followed by a short fine-tune."""

    name = "prune"
    Config = PruneConfig
    config: PruneConfig

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        import torch

        from mlk_plugins.compilers.passes import evaluate, finetune, make_permanent, prune_magnitude
        from mlk_plugins.frameworks.torch.artifacts import load_module

        torch.set_num_threads(inputs.threads)
        data = self._data(inputs)
        module = load_module(source)
        report = prune_magnitude(module, self.config.amount, self.config.structured, scope=self.config.scope,
                                 example=self._example(source, inputs))
        report["val_before_finetune"] = evaluate(module, *data.val)
        if self.config.finetune_epochs:
            finetune(module, *data.train, epochs=self.config.finetune_epochs, lr=self.config.lr,
                     batch_size=self.config.batch_size, seed=inputs.seed)
        make_permanent(module)
        report["val_after_finetune"] = evaluate(module, *data.val)
        kind = "channels" if self.config.structured else "weights"
        return self._write(module, source, out, f"prune {self.config.amount:.0%} {kind}", report)


class DistillConfig(CompileConfig):
    student: dict[str, Any] = Field(description="the student's `model` section, e.g. {name: digits_mlp, hidden: 32}")
    epochs: int = Field(10, ge=1, description="training epochs of the student")
    lr: float = Field(1e-3, gt=0.0, description="learning rate")
    batch_size: int = Field(64, ge=1, description="batch size")
    temperature: float = Field(2.0, gt=0.0, description="softmax temperature of the soft targets")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the distillation loss (1 - alpha: labels)")


class Distill(_TorchPass):
    """Knowledge distillation: a smaller student, trained on the best trial's (the teacher's) outputs."""

    name = "distill"
    Config = DistillConfig
    config: DistillConfig

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        import torch

        from mlk.registry import registry
        from mlk.trial import build_model
        from mlk_plugins.compilers.passes import count_parameters, distill
        from mlk_plugins.frameworks.torch.artifacts import load_module, rebuild_recipe, write_artifact

        torch.set_num_threads(inputs.threads)
        data = self._data(inputs)
        teacher = load_module(source)
        recipe = rebuild_recipe(source)
        torch.manual_seed(inputs.seed)
        student = build_model(registry(), self.config.student, "torch", recipe["meta"])
        student, history = distill(teacher, student, *data.train, *data.val, epochs=self.config.epochs,
                                   lr=self.config.lr, batch_size=self.config.batch_size,
                                   temperature=self.config.temperature, alpha=self.config.alpha, seed=inputs.seed)
        report = {"teacher_parameters": count_parameters(teacher), "student_parameters": count_parameters(student),
                  "history": history}
        artifact = write_artifact(student, out, source, source.meta, {**recipe, "model": self.config.student},
                                  f"distill into {self.config.student.get('name', 'student')}")
        artifact.meta.setdefault("passes", []).append({"pass": self.name, **report})
        artifact.save_meta()
        return artifact
