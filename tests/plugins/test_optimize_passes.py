"""The optimisation passes as compile steps (torch -> torch), through the compiler suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.plugins.compiler_sources import torch_source, trained_digits

from mlk.compiler import CompileInputs
from mlk.testing.compiler import CompilerContract

MLP = {"name": "digits_mlp", "hidden": 64, "dropout": 0.0}
RESNET = {"name": "resnet18", "width": 8, "small_input": True}


class TestFoldBatchNorm(CompilerContract):
    plugin = "fold_bn"
    max_diff = 1e-4
    min_agreement = 1.0

    def source(self, tmp_path: Path) -> tuple[Any, Any, Any, Any]:
        return torch_source(tmp_path, RESNET)

    def test_batchnorms_are_gone(self, compiled: Any) -> None:
        artifact, *_ = compiled
        report = artifact.meta["passes"][-1]
        assert report["pairs_folded"] >= 20 and report["batchnorms_left"] == 0


class TrainingPassContract(CompilerContract):
    """Passes that train: their outputs differ from the teacher's, so agreement is the check."""

    max_diff = 100.0
    min_agreement = 0.8

    def source(self, tmp_path: Path) -> tuple[Any, Any, Any, Any]:
        return torch_source(tmp_path, MLP)

    def compiled_inputs(self) -> CompileInputs:
        return CompileInputs(calibration=None, data=trained_digits(tuple(sorted(MLP.items())))[2], threads=1,
                             seed=0)


class TestPrune(TrainingPassContract):
    plugin = "prune"
    config = {"amount": 0.5, "structured": True, "finetune_epochs": 2}

    def test_model_is_smaller_and_still_accurate(self, compiled: Any) -> None:
        artifact, *_ = compiled
        report = artifact.meta["passes"][-1]
        assert report["parameters_after"] < 0.7 * report["parameters_before"]
        assert report["val_after_finetune"]["accuracy"] > 0.85


class TestDistill(TrainingPassContract):
    plugin = "distill"
    config = {"student": {"name": "digits_mlp", "hidden": 16}, "epochs": 15, "lr": 0.005}

    def test_student_is_smaller(self, compiled: Any) -> None:
        artifact, *_ = compiled
        report = artifact.meta["passes"][-1]
        assert report["student_parameters"] < report["teacher_parameters"] / 3
        assert artifact.meta["parameters"] == report["student_parameters"]
        assert report["history"][-1]["val_accuracy"] > 0.85
