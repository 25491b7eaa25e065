"""A tracker: appends every run and trial event to the JSON-lines file named by MLK_EXAMPLE_EVENTS."""

from __future__ import annotations

import json
import os
from typing import Any

from mlk import hookimpl


def _write(event: str, **fields: Any) -> None:
    path = os.environ.get("MLK_EXAMPLE_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, "pid": os.getpid(), **fields}, default=str) + "\n")


@hookimpl
def mlk_run_started(run_id: str, spec: Any, provenance: dict[str, Any]) -> None:
    _write("run_started", run_id=run_id, spec=spec.name)


@hookimpl
def mlk_trial_reported(run_id: str, trial_id: int, resource: int, metrics: dict[str, float]) -> None:
    _write("trial_reported", run_id=run_id, trial_id=trial_id, resource=resource, metrics=metrics)


@hookimpl
def mlk_run_finished(run_id: str, status: str, summary: dict[str, Any]) -> None:
    _write("run_finished", run_id=run_id, status=status, best=summary.get("best_trial"))


@hookimpl
def mlk_provenance(spec: Any) -> dict[str, Any]:
    return {"example_tracker": {"events_file": os.environ.get("MLK_EXAMPLE_EVENTS")}}
