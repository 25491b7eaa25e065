"""The ``search`` node: the ask/tell loop that turns searcher requests into trials on a backend.

After every ask and every result the searcher's whole state and the requests in flight are
saved in the node's row, so a driver killed at any point resumes: the in-flight requests are
submitted again and each trial continues from its latest checkpoint.
"""

from __future__ import annotations

import os
import time
from typing import Any

from mlk.backend import Backend
from mlk.errors import MlkError, UserError
from mlk.graph import Node
from mlk.progress import SearchProgress
from mlk.searcher import Searcher, TrialRequest
from mlk.trial import TrialResult, TrialTask, derive_seed


def _threads(ctx: Any) -> int:
    res = ctx.spec.resources
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = ctx.hooks.mlk_trial_threads(cpus=cpus, concurrent_trials=res.max_concurrent_trials,
                                    slots_per_trial=res.slots_per_trial)
    return max(1, int(n or 1))


def _preload(reg: Any, spec: Any) -> tuple[str, ...]:
    """The ``preload`` modules of the spec's framework, dataset and builtin model (see :class:`mlk.plugin.Plugin`)."""
    modules: list[str] = []
    for group, section in (("frameworks", "framework"), ("datasets", "data"), ("models", "model")):
        name = (spec[section] or {}).get("name")
        if not name:
            continue
        try:
            cls = reg.get(group, name, where=f"{section}.name")
        except Exception:  # reported where the section is used; preloading is only a speed-up
            continue
        modules += [m for m in (cls.__module__, *cls.preload) if m not in modules]
    return tuple(modules)


def _backend(ctx: Any) -> Backend:
    """The spec's backend, told which modules its workers should import first."""
    reg = ctx.registry
    backend_cls = reg.get("backends", ctx.spec.resources.backend, where="resources.backend")
    backend_cls.ensure_available()
    backend: Backend = backend_cls(ctx.spec.resources, ctx.store.home)
    backend.preload_modules = _preload(reg, ctx.spec)
    return backend


def prepare(node: Node, ctx: Any) -> None:
    """The search node's head start: the backend begins warming its workers (importing the
    framework) while the data node runs (:meth:`mlk.backend.Backend.prepare`)."""
    _backend(ctx).prepare()


class SearchLoop:
    """Drives one search to the end; see the module docstring."""

    def __init__(self, node: Node, ctx: Any) -> None:
        self.node = node
        self.ctx = ctx
        self.spec = ctx.spec
        self.store = ctx.store
        self.run_id = ctx.run_id
        reg = ctx.registry
        searcher_cls = reg.get("searchers", self.spec.searcher.name, where="searcher.name")
        self.searcher: Searcher = searcher_cls(self.spec.searcher, self.spec.space,
                                               derive_seed(self.spec["seed"], "searcher"))
        self.backend = _backend(ctx)
        self.searcher.concurrency = self.backend.capacity()
        self.in_flight: dict[int, TrialRequest] = {}
        self.attempts: dict[int, int] = {}
        self.queue: list[TrialRequest] = []
        self.threads = _threads(ctx)
        self.max_resource = self.spec.searcher.max_resource
        self.succeeded = False  # some trial completed or paused: the all-failing check is over

    # -- state ------------------------------------------------------------------------------------

    def restore(self) -> bool:
        row = self.store.node(self.run_id, self.node.id)
        state = row["state"] if row else None
        if not state:
            return False
        self.searcher.load_state_dict(state["searcher"])
        self.queue = [TrialRequest.from_dict(r) for r in state["in_flight"]]
        self.attempts = {int(k): v for k, v in state.get("attempts", {}).items()}
        return True

    def save(self) -> None:
        state = {
            "searcher": self.searcher.state_dict(),
            "in_flight": [r.to_dict() for r in [*self.in_flight.values(), *self.queue]],
            "attempts": self.attempts,
        }
        self.store.save_node_state(self.run_id, self.node.id, state)

    # -- the loop ---------------------------------------------------------------------------------

    def submit(self, req: TrialRequest) -> None:
        seed = derive_seed(self.spec["seed"], "trial", req.trial_id)
        self.store.upsert_trial(self.run_id, req.trial_id, req.hparams, seed, "running", req.resource, req.parent)
        task = TrialTask(
            run_id=self.run_id, trial_id=req.trial_id, hparams=req.hparams, seed=seed, target=req.resource,
            spec=self.spec.data, home=str(self.store.home), parent=req.parent, threads=self.threads,
            attempt=self.attempts.get(req.trial_id, 0),
        )
        self.backend.submit(task)
        self.in_flight[req.trial_id] = req

    def fill(self) -> bool:
        """Submit requests (queued first, then asked) while the backend has room; True if any was."""
        submitted = False
        while len(self.in_flight) < self.backend.capacity():
            if self.queue:
                req = self.queue.pop(0)
            else:
                asked = self.searcher.ask()
                if asked is None:
                    break
                req = asked
            self.submit(req)
            submitted = True
        return submitted

    def handle(self, result: TrialResult, progress: SearchProgress) -> None:
        req = self.in_flight.pop(result.trial_id)
        progress.running = len(self.in_flight)
        if result.error is not None:
            if result.user_error:
                raise UserError(f"trial {req.trial_id}: {result.error}")
            tries = self.attempts.get(req.trial_id, 0)
            if tries < self.spec.resources.max_restarts:
                self.attempts[req.trial_id] = tries + 1
                self.store.add_event(self.run_id, "trial_retry", {"trial_id": req.trial_id, "error": result.error})
                progress.note(f"trial {req.trial_id} failed, retrying from its checkpoint "
                              f"({tries + 1}/{self.spec.resources.max_restarts}): {_last_line(result.error)}")
                self.queue.insert(0, req)
                return
            self.store.update_trial(self.run_id, req.trial_id, status="failed", error=result.error)
            self.searcher.tell(req.trial_id, req.resource, None)
            self.ctx.hooks.mlk_trial_finished(run_id=self.run_id, trial_id=req.trial_id, status="failed",
                                              resource=result.resource, metrics=result.metrics)
            progress.trial_failed(req.trial_id, result.error)
            return
        if result.resource < req.resource and not result.metrics:
            raise MlkError(f"trial {req.trial_id} ended without reporting any metric")
        status = "completed" if result.resource >= self.max_resource else "paused"
        self.store.update_trial(self.run_id, req.trial_id, status=status)
        self.searcher.tell(req.trial_id, req.resource, result.value)
        self.ctx.hooks.mlk_trial_finished(run_id=self.run_id, trial_id=req.trial_id, status=status,
                                          resource=result.resource, metrics=result.metrics)
        progress.trial_done(req.trial_id, status, result)

    def check_not_all_failing(self) -> None:
        """Stop early when every trial so far failed: the cause is almost surely common to all."""
        if self.succeeded:
            return
        trials = self.store.trials(self.run_id)
        failed = [t for t in trials if t["status"] == "failed"]
        self.succeeded = any(t["status"] in ("completed", "paused") for t in trials)
        if len(failed) >= max(3, self.backend.capacity()) and not self.succeeded:
            raise MlkError(f"all {len(failed)} trials so far failed; stopping the search. The last error:\n"
                           f"{failed[-1]['error']}")

    def run(self) -> dict[str, Any]:
        resumed = self.restore()
        progress = SearchProgress(self.ctx, self.searcher, self.spec.searcher.metric, self.spec.searcher.mode)
        if resumed:
            progress.note(f"search resumed: {len(self.queue)} trial request(s) continue from their checkpoints")
        self.backend.start()
        try:
            with progress:
                results: list[TrialResult] = []
                while True:
                    # One save per pass, after the results are told and the freed slots refilled: the
                    # state grows with the search, so saving it is not free. A driver killed before the
                    # save resubmits those requests; a trial already at its target trains nothing.
                    if self.fill() or results:
                        self.save()
                    if not self.in_flight:
                        if self.searcher.is_finished():
                            break
                        raise MlkError(f"searcher '{self.searcher.name}' has nothing running and nothing to "
                                       "ask, yet says it is not finished")
                    results = self.backend.wait(timeout=0.5)
                    for result in results:
                        self.handle(result, progress)
                    if results:
                        self.check_not_all_failing()
                    progress.refresh(len(self.in_flight))
        finally:
            self.backend.shutdown()
        for t in self.store.trials(self.run_id):
            if t["status"] == "paused":  # the search is over: a trial left at a rung was stopped there
                self.store.update_trial(self.run_id, t["trial_id"], status="stopped")
        trials = self.store.trials(self.run_id)
        failed = [t for t in trials if t["status"] == "failed"]
        if trials and len(failed) == len(trials):  # never reuse such a search: nothing came of it
            raise MlkError(f"every trial failed ({len(failed)}); the last error:\n{failed[-1]['error']}")
        return {
            "run_id": self.run_id,
            "trials": len(trials),
            "failed": sum(t["status"] == "failed" for t in trials),
            "epochs": sum(t["resource"] for t in trials),
            "searcher": self.searcher.name,
        }


def searcher_from_record(reg: Any, spec: dict[str, Any], state: dict[str, Any] | None) -> Searcher:
    """The searcher of a recorded run, rebuilt from its spec and saved state (for reports)."""
    from mlk.hyperparameters import SearchSpace, parse_hyperparameter
    from mlk.spec import validate_section

    cls = reg.get("searchers", spec["searcher"]["name"], where="searcher.name")
    space = SearchSpace({k: parse_hyperparameter(v) for k, v in spec["hyperparameters"].items()})
    searcher: Searcher = cls(validate_section(cls.Config, spec["searcher"], "searcher"), space,
                             derive_seed(spec["seed"], "searcher"))
    if state:
        searcher.load_state_dict(state["searcher"])
    return searcher


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


def run(node: Node, ctx: Any) -> dict[str, Any]:
    started = time.time()
    out = SearchLoop(node, ctx).run()
    out["seconds"] = round(time.time() - started, 3)
    return out
