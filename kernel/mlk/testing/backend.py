"""Conformance suite of backends (``mlk.backends``): real trial processes, real store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from mlk.backend import Backend
from mlk.registry import registry
from mlk.store import RunStore
from mlk.testing import build_spec
from mlk.trial import TrialResult, TrialTask


class BackendContract:
    """Subclass and set ``plugin``; override ``resources`` for backend options."""

    plugin: ClassVar[str] = ""
    resources: ClassVar[dict[str, Any]] = {}

    def setup_run(self, tmp_path: Path, function: str = "mlk.testing.trials:counter") -> tuple[Backend, Any]:
        spec = build_spec({"framework": {"name": "python", "function": function},
                           "resources": {"backend": self.plugin, "max_concurrent_trials": 2, **self.resources}},
                          tmp_path)
        store = RunStore(tmp_path)
        store.create_run("r1", "contract", spec.hash, spec.data)
        cls = registry().get("backends", self.plugin, where="resources.backend")
        backend = cls(spec.resources, tmp_path)
        return backend, (spec, store)

    def task(self, spec: Any, store: RunStore, trial_id: int, target: int = 2) -> TrialTask:
        store.upsert_trial("r1", trial_id, {"x": 0.1 * trial_id}, 100 + trial_id, "running", target)
        return TrialTask(run_id="r1", trial_id=trial_id, hparams={"x": 0.1 * trial_id}, seed=100 + trial_id,
                         target=target, spec=spec.data, home=str(store.home))

    def collect(self, backend: Backend, n: int, timeout: float = 120.0) -> list[TrialResult]:
        results: list[TrialResult] = []
        deadline = time.time() + timeout
        while len(results) < n and time.time() < deadline:
            results += backend.wait(timeout=1.0)
        assert len(results) == n, f"got {len(results)} of {n} results within {timeout}s"
        return results

    def test_registered_class(self) -> None:
        cls = registry().get("backends", self.plugin, where="resources.backend")
        assert issubclass(cls, Backend) and cls.name == self.plugin and cls.__doc__

    def test_describe_is_a_plan(self, tmp_path: Path) -> None:
        backend, _ = self.setup_run(tmp_path)
        plan = backend.describe()
        assert plan["backend"] == self.plugin and plan["max_concurrent_trials"] == 2

    def test_runs_trials_and_reports(self, tmp_path: Path) -> None:
        backend, (spec, store) = self.setup_run(tmp_path)
        backend.start()
        try:
            for tid in (1, 2, 3):
                backend.submit(self.task(spec, store, tid))
            results = self.collect(backend, 3)
        finally:
            backend.shutdown()
        assert sorted(r.trial_id for r in results) == [1, 2, 3]
        assert all(r.error is None and r.resource == 2 and r.value is not None for r in results), results
        assert len(store.metrics("r1")) == 6
        assert len(store.checkpoints("r1")) == 3  # retention keeps one per trial

    def test_dead_worker_is_a_failed_result(self, tmp_path: Path) -> None:
        backend, (spec, store) = self.setup_run(tmp_path, function="mlk.testing.trials:die")
        backend.start()
        try:
            backend.submit(self.task(spec, store, 1))
            (result,) = self.collect(backend, 1)
            assert result.error and not result.user_error
            # the backend recovers: the next task runs
            ok_spec = build_spec({"resources": {"backend": self.plugin, **self.resources}}, tmp_path)
            backend.submit(self.task(ok_spec, store, 2))
            (second,) = self.collect(backend, 1)
        finally:
            backend.shutdown()
        assert second.error is None, second.error

    def test_dead_worker_fails_only_its_own_task(self, tmp_path: Path) -> None:
        backend, (spec, store) = self.setup_run(tmp_path, function="mlk.testing.trials:counter_after_pause")
        die_spec = build_spec({"framework": {"name": "python", "function": "mlk.testing.trials:die"},
                               "resources": {"backend": self.plugin, **self.resources}}, tmp_path)
        backend.start()
        try:
            backend.submit(self.task(spec, store, 1))  # still running when trial 2's worker dies
            backend.submit(self.task(die_spec, store, 2))
            results = {r.trial_id: r for r in self.collect(backend, 2)}
        finally:
            backend.shutdown()
        assert results[2].error and not results[2].user_error
        assert results[1].error is None and results[1].resource == 2, results[1].error

    def test_trial_exception_is_reported_with_traceback(self, tmp_path: Path) -> None:
        backend, (spec, store) = self.setup_run(tmp_path, function="mlk.testing.trials:no_such_function")
        backend.start()
        try:
            backend.submit(self.task(spec, store, 1))
            (result,) = self.collect(backend, 1)
        finally:
            backend.shutdown()
        assert result.error and "no_such_function" in result.error

    def test_capacity_follows_the_spec(self, tmp_path: Path) -> None:
        backend, _ = self.setup_run(tmp_path)
        assert backend.capacity() == 2
