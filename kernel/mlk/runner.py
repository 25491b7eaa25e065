"""Executing a run: plan the graph, then run (or reuse) each node in order, recording everything.

``mlk run`` on a spec whose previous run was interrupted (killed, Ctrl-C, a crash) resumes that
run: its finished nodes are kept and the search continues from its saved state. Otherwise a new
run starts, reusing any node whose key is complete in the store (``--fresh`` recomputes all).
"""

from __future__ import annotations

import secrets
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from mlk.compiler import Unavailable
from mlk.errors import MlkError, UserError
from mlk.graph import Graph, Node, plan
from mlk.imports import import_object
from mlk.spec import Spec, spec_changes
from mlk.stages.validate import GateFailed
from mlk.store import RunStore


@dataclass
class RunContext:
    """What a node executor sees: the run, its spec, the store, the plugins, its inputs' outputs."""

    run_id: str
    spec: Spec
    store: RunStore
    registry: Any
    graph: Graph
    outputs: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False

    @property
    def hooks(self) -> Any:
        return self.registry.hooks

    def say(self, message: str) -> None:
        if not self.quiet:
            from mlk.console import err_console

            err_console().print(message, highlight=False)


def new_run_id(spec_name: str) -> str:
    return f"{spec_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def execute(spec: Spec, *, fresh: bool = False, quiet: bool = False, reproduces: str | None = None,
            resume_run: str | None = None, only: list[str] | None = None) -> str:
    """Run ``spec`` to completion; return the run id. Raises on failure after recording it.

    ``only`` limits the run to those nodes and what they depend on (``mlk deploy`` runs one target's
    deploy nodes of a finished run); the other nodes keep their recorded state.
    """
    from mlk.provenance import collect_provenance
    from mlk.registry import registry

    reg = registry()
    store = RunStore()
    graph = plan(spec, reg.hooks)
    if only:
        graph = graph.subgraph(only)
    previous = None
    if resume_run:
        previous = store.run(resume_run)
    elif not fresh and not reproduces:
        previous = store.resumable_run(spec.hash) or _extendable(store, spec, reg)
    if previous is not None:
        run_id = previous["id"]
        store.update_run(run_id, status="running", pid=_pid(), error=None)
        provenance = previous["provenance"] or {}
        if previous["spec"] != spec.data:
            _accept_changes(store, previous, spec, reg, quiet)
    else:
        run_id = new_run_id(spec.name)
        store.create_run(run_id, spec.name, spec.hash, spec.data, reproduces=reproduces)
    ctx = RunContext(run_id, spec, store, reg, graph, quiet=quiet)
    _prepare(ctx)  # head starts (workers importing the framework) overlap what follows
    if previous is None:
        provenance = collect_provenance(spec, reg)
        store.update_run(run_id, provenance_json=provenance)
    ctx.say(f"{'resuming' if previous else 'run'} [bold]{run_id}[/] ({spec.file})")
    store.add_event(run_id, "run_resumed" if previous else "run_started", {"spec": spec.name})
    reg.hooks.mlk_run_started(run_id=run_id, spec=spec, provenance=provenance)

    status = "failed"
    summary: dict[str, Any] = {}
    deferred: list[str] = []        # failures that let independent nodes go on (gates)
    blocked: dict[str, str] = {}    # node id -> why it did not complete
    try:
        for node in graph.nodes:
            why = next((blocked[d] for d in node.inputs if d in blocked and d not in node.optional), None)
            if why is not None:
                store.fail_node(run_id, node.id, why, status="skipped", key=node.key, kind=node.kind)
                blocked[node.id] = why
                continue
            missing = sorted(d for d in node.optional if d in blocked)
            if missing:  # not the node a run with all of its inputs would have made
                graph.rekey({node.id: "missing " + ",".join(missing)})
            try:
                ctx.outputs[node.id] = _run_node(ctx, node, reuse=not fresh and not reproduces)
            except Unavailable as e:
                store.fail_node(run_id, node.id, str(e), status="unavailable", key=node.key, kind=node.kind)
                blocked[node.id] = f"{node.id} is unavailable here"
                ctx.say(f"[yellow]{node.id}: unavailable here[/]: {e}")
            except GateFailed as e:
                store.fail_node(run_id, node.id, str(e), outputs=e.report, key=node.key, kind=node.kind)
                blocked[node.id] = str(e)
                deferred.append(str(e))
        summary = dict(ctx.outputs.get("select", {}))
        summary["artifacts"] = {n: {"format": o["format"], "uri": o["uri"]} for n, o in ctx.outputs.items()
                                if isinstance(o, dict) and "manifest" in o and "format" in o}
        summary["deployments"] = {n.id: {k: ctx.outputs[n.id][k] for k in ("model", "version", "target", "promoted",
                                                                            "bundle")}
                                  for n in graph.nodes if n.kind == "deploy" and n.id in ctx.outputs}
        summary["not_completed"] = blocked
        if deferred:
            raise MlkError("\n  ".join(deferred))
        status = "completed"
        if only:
            summary, failed = _partial_summary(store, run_id, summary, graph)
            if failed:
                status = "failed"
                store.update_run(run_id, status=status, summary_json=summary,
                                 error=f"nodes that failed before: {', '.join(failed)}")
    except KeyboardInterrupt:
        status = "interrupted"
        store.update_run(run_id, status=status, error="interrupted by the user")
        ctx.say(f"[yellow]interrupted[/]: resume with the same command, or `mlk runs resume {run_id}`")
        raise
    except MlkError as e:
        store.update_run(run_id, status=status, error=str(e), summary_json=summary or None)
        raise
    except BaseException:
        store.update_run(run_id, status=status, error=traceback.format_exc())
        raise
    finally:
        store.add_event(run_id, f"run_{status}", {})
        reg.hooks.mlk_run_finished(run_id=run_id, status=status, summary=summary)
        if status == "completed":
            store.update_run(run_id, status=status, finished=time.time(), summary_json=summary)
        store.close()
    return run_id


def _partial_summary(store: RunStore, run_id: str, summary: dict[str, Any],
                     graph: Graph) -> tuple[dict[str, Any], list[str]]:
    """After running part of a run's graph: the recorded summary updated with what ran, and the nodes
    outside the part that had failed (the run stays failed for them)."""
    recorded = store.run(run_id)
    merged = dict(recorded["summary"] or {})
    for key in ("artifacts", "deployments"):
        merged[key] = {**merged.get(key, {}), **summary.get(key, {})}
    for key, value in summary.items():
        merged.setdefault(key, value)
    failed = [n["node_id"] for n in store.nodes(run_id) if n["status"] == "failed" and n["node_id"] not in graph.by_id]
    return merged, failed


def _extendable(store: RunStore, spec: Spec, reg: Any) -> dict[str, Any] | None:
    """The latest run of this spec whose search may continue under ``spec``: only safe keys changed
    (a larger budget, more concurrency), so its trials stay valid and are reused."""
    last = store.latest_run_of(spec.name)
    if last is None or last["status"] == "failed" or last["spec"] == spec.data or \
            store.node(last["id"], "search") is None:
        return None
    safe, unsafe = spec_changes(last["spec"], spec.data, _extendable_keys(spec, reg))
    return last if safe and not unsafe else None


def _extendable_keys(spec: Spec, reg: Any) -> tuple[str, ...]:
    cls = reg.get("searchers", spec["searcher"]["name"], where="searcher.name")
    return tuple(cls.extendable_keys)


def _accept_changes(store: RunStore, previous: dict[str, Any], spec: Spec, reg: Any, quiet: bool) -> None:
    safe, unsafe = spec_changes(previous["spec"], spec.data, _extendable_keys(spec, reg))
    if unsafe:
        raise UserError(f"run {previous['id']} cannot continue with this spec: these changes invalidate its "
                        "trials:\n    " + "\n    ".join(unsafe),
                        where="resume", hint=f"start a new run instead (`mlk run +spec={spec.name} ...`); "
                        "changes a search can absorb: searcher.max_trials, resources.*, storage.keep.*")
    store.update_run(previous["id"], spec_json=spec.data, spec_hash=spec.hash, status="running")
    store.add_event(previous["id"], "spec_changed", {"changes": safe})
    if not quiet:
        from mlk.console import err_console

        err_console().print(f"continuing run {previous['id']} with: " + "; ".join(safe), highlight=False)


def _prepare(ctx: RunContext) -> None:
    """Call the ``prepare`` of every node not yet done in this run (see :class:`mlk.graph.Node`)."""
    import logging

    for node in ctx.graph.nodes:
        mine = ctx.store.node(ctx.run_id, node.id)
        if not node.prepare or (mine and mine["status"] == "done"):
            continue
        try:
            import_object(node.prepare, where=f"run graph node '{node.id}'")(node, ctx)
        except Exception as e:  # a head start only: the node itself reports what is wrong
            logging.getLogger("mlk").debug("preparing %s failed: %s", node.id, e)


def _run_node(ctx: RunContext, node: Node, reuse: bool) -> Any:
    store, run_id = ctx.store, ctx.run_id
    mine = store.node(run_id, node.id)
    if mine and mine["status"] == "done" and mine["key"] == node.key and not node.volatile:
        return mine["outputs"]
    if reuse and not node.volatile:
        done = store.completed_node(node.key)
        if done is not None:
            store.finish_node(run_id, node.id, done["outputs"], reused_from=done["run_id"], key=node.key,
                              kind=node.kind)
            ctx.say(f"[dim]{node.id}: reused from run {done['run_id']}[/]")
            return done["outputs"]
    store.start_node(run_id, node.id, node.key, node.kind)
    executor = import_object(node.run, where=f"run graph node '{node.id}'")
    try:
        outputs = executor(node, ctx)
    except KeyboardInterrupt:
        store.fail_node(run_id, node.id, "interrupted")
        raise
    except (Unavailable, GateFailed):
        raise
    except BaseException as e:
        store.fail_node(run_id, node.id, f"{type(e).__name__}: {e}")
        raise
    if node.volatile and isinstance(outputs, dict) and outputs.get("fingerprint"):
        ctx.graph.rekey({node.id: outputs["fingerprint"]})
    store.finish_node(run_id, node.id, outputs, key=node.key, kind=node.kind)
    return outputs


def _pid() -> int:
    import os

    return os.getpid()
