"""Conformance suite of frameworks (``mlk.frameworks``): real training through ``run_trial``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mlk.framework import Framework
from mlk.registry import registry
from mlk.store import RunStore
from mlk.testing import build_spec
from mlk.trial import TrialTask, run_trial


class FrameworkContract:
    """Subclass and set ``plugin`` and ``sections`` (framework, data, model, hyperparameters,
    searcher metric) describing a small real training job that reports ``metric`` each epoch.

    A framework with ``max_slots > 1`` also runs the job on two rank processes
    (``resources.slots_per_trial: 2``, marked slow); set ``distributed_tolerance`` (relative) to
    also require its metrics to match one process's, with ``distributed_sections`` overriding
    sections for that comparison (e.g. no dropout: ranks draw their own masks).
    """

    plugin: ClassVar[str] = ""
    sections: ClassVar[dict[str, Any]] = {}
    hparams: ClassVar[dict[str, Any]] = {}
    distributed_tolerance: ClassVar[float | None] = None
    distributed_sections: ClassVar[dict[str, Any]] = {}

    def run(self, tmp_path: Path, run_id: str, target: int, deterministic: bool = True,
            slots: int = 1, sections: dict[str, Any] | None = None) -> tuple[Any, RunStore]:
        raw = {**self.sections, **(sections or {}), "reproducibility": {"deterministic": deterministic}}
        if slots > 1:
            raw["resources"] = {**raw.get("resources", {}), "slots_per_trial": slots}
        spec = build_spec(raw, tmp_path)
        store = RunStore(tmp_path)
        if not any(r["id"] == run_id for r in store.runs()):
            store.create_run(run_id, "contract", spec.hash, spec.data)
        store.upsert_trial(run_id, 1, self.hparams, 1234, "running", target)
        task = TrialTask(run_id=run_id, trial_id=1, hparams=self.hparams, seed=1234, target=target, spec=spec.data,
                         home=str(tmp_path), threads=1)
        result = run_trial(task)
        assert result.error is None, result.error
        return result, store

    def test_registered_class(self) -> None:
        cls = registry().get("frameworks", self.plugin, where="framework.name")
        assert issubclass(cls, Framework) and cls.name == self.plugin and cls.__doc__

    def test_trains_reports_and_checkpoints(self, tmp_path: Path) -> None:
        result, store = self.run(tmp_path, "a", target=2)
        metric = self.sections["searcher"]["metric"]
        reports = store.metrics("a", 1)
        assert [r["resource"] for r in reports] == [1, 2]
        assert all(metric in r["metrics"] for r in reports)
        assert result.resource == 2 and result.value == reports[-1]["metrics"][metric]
        assert [c["resource"] for c in store.checkpoints("a", 1)] == [2]

    def test_saves_when_checkpoint_due(self, tmp_path: Path) -> None:
        """``storage.checkpoint_every_s``: 0 saves every epoch; a long interval saves only at the
        request's target (retention keeps them all here, so every save shows)."""
        keep = {"trial_latest": 10, "trial_best": 0}
        storage = {"name": "local", "path": str(tmp_path / "store"), **self.sections.get("storage", {}),
                   "keep": keep}
        _, store = self.run(tmp_path, "every", target=3, sections={"storage": {**storage, "checkpoint_every_s": 0}})
        assert [c["resource"] for c in store.checkpoints("every", 1)] == [1, 2, 3]
        _, store = self.run(tmp_path, "due", target=3, sections={"storage": {**storage, "checkpoint_every_s": 3600}})
        assert [c["resource"] for c in store.checkpoints("due", 1)] == [3]
        assert [r["resource"] for r in store.metrics("due", 1)] == [1, 2, 3]

    def test_resume_continues_from_checkpoint_bit_identically(self, tmp_path: Path) -> None:
        self.run(tmp_path, "split", target=1)
        _, store = self.run(tmp_path, "split", target=3)
        self.run(tmp_path, "whole", target=3)
        split = [r["metrics"] for r in store.metrics("split", 1)]
        whole = [r["metrics"] for r in store.metrics("whole", 1)]
        assert len(split) == 3
        assert split == whole

    def test_deterministic_runs_are_identical(self, tmp_path: Path) -> None:
        _, store = self.run(tmp_path / "one", "x", target=2)
        _, store2 = self.run(tmp_path / "two", "x", target=2)
        assert [r["metrics"] for r in store.metrics("x", 1)] == [r["metrics"] for r in store2.metrics("x", 1)]

    @pytest.mark.slow
    def test_data_parallel_trial_records_once(self, tmp_path: Path) -> None:
        cls = registry().get("frameworks", self.plugin, where="framework.name")
        if cls.max_slots < 2:
            pytest.skip(f"framework '{self.plugin}' declares max_slots = {cls.max_slots}: no data parallelism")
        metric = self.sections["searcher"]["metric"]
        result, store = self.run(tmp_path, "ddp", target=2, slots=2, sections=self.distributed_sections)
        reports = store.metrics("ddp", 1)
        assert [r["resource"] for r in reports] == [1, 2]  # rank 0 alone records
        assert [c["resource"] for c in store.checkpoints("ddp", 1)] == [2]
        assert result.resource == 2 and math.isfinite(reports[-1]["metrics"][metric])
        if self.distributed_tolerance is not None:
            self.run(tmp_path, "one", target=2, sections=self.distributed_sections)
            for two, one in zip(reports, store.metrics("one", 1), strict=True):
                assert two["metrics"] == pytest.approx(one["metrics"], rel=self.distributed_tolerance)
