"""Every pluggy hook mlk calls, grouped by lifecycle stage. This module is the API reference.

A plugin implements hooks by defining functions (or methods) of these names decorated with
:data:`mlk.hookimpl`, and registers the module or class in the entry-point group ``mlk.hooks``.
Event hooks are called in the process where the event happens (trial hooks run inside trial
worker processes). Kernel defaults are ordinary ``trylast`` implementations in
:mod:`mlk.defaults`; a plugin overrides a firstresult default by returning a non-None value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from mlk.graph import Node
    from mlk.spec import Spec

PROJECT = "mlk"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- planning -------------------------------------------------------------------------------------


@hookspec
def mlk_graph_nodes(spec: Spec) -> list[Node]:
    """Contribute nodes to the run graph of ``spec``.

    Called once per plan (``mlk run``, ``mlk graph``). Every implementation's list is added to
    the graph; a node's ``inputs`` name the ids of nodes it depends on. The kernel default
    contributes ``data``, ``search`` and ``select``; later stages (compile, validate, deploy)
    arrive as plugins implementing this hook, without a kernel change.

    Args:
        spec: the validated spec.

    Returns:
        Nodes to add (possibly empty). Not firstresult: all results are combined.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def mlk_trial_threads(cpus: int, concurrent_trials: int, slots_per_trial: int) -> int | None:
    """How many CPU threads one trial worker may use.

    Args:
        cpus: CPUs usable by this process.
        concurrent_trials: ``resources.max_concurrent_trials``.
        slots_per_trial: ``resources.slots_per_trial``.

    Returns:
        A thread count (firstresult). The kernel default divides the CPUs evenly, at least 1.
    """


# -- provenance -----------------------------------------------------------------------------------


@hookspec
def mlk_provenance(spec: Spec) -> dict[str, Any] | None:
    """Contribute facts to a run's provenance record (versions, hardware, flags).

    Called once when a run starts, in the driver process. Every implementation's mapping is
    merged into the record (later keys win); the kernel default records Python, packages, git
    state of the working directory, hardware and thread settings.

    Returns:
        A JSON-serialisable mapping, or None. Not firstresult.
    """


# -- events ---------------------------------------------------------------------------------------


@hookspec
def mlk_run_started(run_id: str, spec: Spec, provenance: dict[str, Any]) -> None:
    """A run started (or resumed). Called in the driver process after provenance is recorded."""


@hookspec
def mlk_trial_reported(run_id: str, trial_id: int, resource: int, metrics: dict[str, float]) -> None:
    """A trial reported ``metrics`` at ``resource`` epochs. Called inside the trial's worker process,
    after the metrics are in the run store."""


@hookspec
def mlk_checkpoint_saved(run_id: str, trial_id: int, resource: int, uri: str) -> None:
    """A trial checkpoint at ``resource`` epochs was stored, checksummed, at ``uri``. Called inside
    the trial's worker process."""


@hookspec
def mlk_trial_finished(run_id: str, trial_id: int, status: str, resource: int, metrics: dict[str, float]) -> None:
    """A trial request ended in the driver: ``status`` is ``paused`` (reached the requested resource,
    may be promoted later), ``completed`` or ``failed``."""


@hookspec
def mlk_run_finished(run_id: str, status: str, summary: dict[str, Any]) -> None:
    """A run ended with ``status`` ``completed``, ``failed`` or ``interrupted``. ``summary`` holds
    the best trial, its metrics and checkpoint. Called in the driver process."""


@hookspec
def mlk_deployment_changed(model: str, version: int, action: str, routing: dict[str, Any]) -> None:
    """Which version of a registered model takes traffic changed: ``action`` is ``production`` (a
    deploy or ``mlk models promote`` made ``version`` production), ``canary`` (``version`` now takes
    ``routing["canary_percent"]`` percent beside production), ``rollback`` (``version`` is production
    again) or ``rollback canary`` (the canary ``version`` was dropped; a server's automatic rollback
    is one). ``routing`` is the routing after the change: ``production`` and ``canary`` (version
    numbers or None), ``canary_percent``. Called after the change is committed to the registry, in
    the process that made it (the driver, the CLI, or a server); an exception a tracker raises is
    printed as a warning and does not undo the change."""
