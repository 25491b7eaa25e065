"""Node ``prepare`` head starts: called when a run starts for the nodes still to run, errors ignored;
the local backend's starts its fork server."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from mlk.graph import Graph, Node
from mlk.runner import RunContext, _prepare
from mlk.store import RunStore

CALLED: list[str] = []


def record(node: Node, ctx: Any) -> None:
    CALLED.append(node.id)


def broken(node: Node, ctx: Any) -> None:
    raise RuntimeError("a head start that fails")


def test_prepare_runs_for_nodes_not_done_and_ignores_errors(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.create_run("r", "s", "h", {})
    here = f"{__name__}:record"
    graph = Graph([
        Node(id="done", kind="k", run="x:y", prepare=here),
        Node(id="broken", kind="k", run="x:y", prepare=f"{__name__}:broken"),
        Node(id="todo", kind="k", run="x:y", prepare=here, inputs=["done"]),
        Node(id="plain", kind="k", run="x:y"),
    ])
    store.start_node("r", "done", graph.by_id["done"].key, "k")
    store.finish_node("r", "done", {})
    CALLED.clear()
    _prepare(RunContext("r", None, store, None, graph))  # type: ignore[arg-type]
    assert CALLED == ["todo"]


def test_local_backend_prepare_starts_the_fork_server(tmp_path: Path) -> None:
    from multiprocessing import forkserver

    from mlk_plugins.backends.local import LocalBackend, LocalResources

    backend = LocalBackend(LocalResources(max_concurrent_trials=1), tmp_path)
    backend.preload_modules = ("json",)
    backend.prepare()
    assert forkserver._forkserver._forkserver_pid is not None  # started, before any process was asked for
    # It serves: a process started from it runs.
    ctx = multiprocessing.get_context("forkserver")
    proc = ctx.Process(target=print, args=("started from the fork server",))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
