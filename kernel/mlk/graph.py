"""The run graph: nodes contributed by plugins, ordered, each keyed by what determines its output.

A node's key is a sha256 of its kind, its config and its inputs' keys, so two runs whose nodes
agree share work: a node whose key is already complete in the run store is reused instead of
recomputed. A ``volatile`` node (the data node) always runs, and what it found (the data's
fingerprint) is mixed into its key, so changed data re-runs everything downstream.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from mlk.errors import MlkError


@dataclass
class Node:
    """One step of a run.

    Attributes:
        id: unique in the graph (``data``, ``search``, ``compile/onnx``).
        kind: what the step does, shown by ``mlk graph``.
        run: ``"module:function"`` executing it: ``function(node, ctx) -> outputs`` (a JSON mapping),
            where ``ctx`` is a :class:`mlk.runner.RunContext`.
        config: the part of the spec its output depends on (hashed into the key).
        inputs: ids of the nodes whose outputs it consumes.
        volatile: always executed; its output's ``fingerprint`` joins its key.
        optional: inputs the node runs without when they do not complete (failed gates, unavailable
            here); which ones were missing joins its key, so it is not reused where they completed.
        describe: a line for ``mlk graph`` saying what it would do.
        prepare: optional ``"module:function"`` called as ``function(node, ctx)`` when the run starts,
            before any node executes, if this node has not completed in this run: it may begin slow
            work that the nodes ahead of it can overlap (the search starts its workers' imports). It
            must return at once and never matter for correctness; its errors are ignored.
    """

    id: str
    kind: str
    run: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    volatile: bool = False
    optional: list[str] = field(default_factory=list)
    describe: str = ""
    prepare: str = ""
    key: str = ""


class Graph:
    """Nodes in dependency order, with keys."""

    def __init__(self, nodes: list[Node]) -> None:
        by_id: dict[str, Node] = {}
        for node in nodes:
            if node.id in by_id:
                raise MlkError(f"two plugins contributed a run graph node with id '{node.id}'")
            by_id[node.id] = node
        for node in nodes:
            for dep in node.inputs:
                if dep not in by_id:
                    raise MlkError(f"run graph node '{node.id}' needs '{dep}', which no plugin contributed")
        self.nodes = _toposort(by_id)
        self.by_id = {n.id: n for n in self.nodes}
        self.found: dict[str, str] = {}
        self.rekey()

    def rekey(self, extra: dict[str, str] | None = None) -> None:
        """Compute every key in order; ``extra`` mixes what a node found (a data fingerprint, missing
        optional inputs) into its key, adding to what earlier calls gave."""
        self.found.update(extra or {})
        for node in self.nodes:
            payload = {
                "kind": node.kind,
                "config": node.config,
                "inputs": [self.by_id[d].key for d in node.inputs],
                "found": self.found.get(node.id, ""),
            }
            node.key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def subgraph(self, ids: list[str]) -> Graph:
        """The nodes ``ids`` and everything they depend on, keyed as here."""
        keep: set[str] = set()
        todo = list(ids)
        while todo:
            node_id = todo.pop()
            if node_id not in keep:
                keep.add(node_id)
                todo.extend(self.by_id[node_id].inputs)
        sub = Graph([n for n in self.nodes if n.id in keep])
        sub.rekey(self.found)
        return sub

    def to_dict(self) -> list[dict[str, Any]]:
        return [
            {"id": n.id, "kind": n.kind, "key": n.key, "inputs": n.inputs, "volatile": n.volatile,
             "describe": n.describe, "config": n.config, "optional": n.optional}
            for n in self.nodes
        ]


def _toposort(by_id: dict[str, Node]) -> list[Node]:
    order: list[Node] = []
    state: dict[str, int] = {}

    def visit(node_id: str, path: list[str]) -> None:
        if state.get(node_id) == 2:
            return
        if state.get(node_id) == 1:
            raise MlkError("the run graph has a cycle: " + " -> ".join([*path, node_id]))
        state[node_id] = 1
        for dep in by_id[node_id].inputs:
            visit(dep, [*path, node_id])
        state[node_id] = 2
        order.append(by_id[node_id])

    for node_id in by_id:
        visit(node_id, [])
    return order


def plan(spec: Any, hooks: Any) -> Graph:
    """The run graph of ``spec``: every node from every ``mlk_graph_nodes`` implementation."""
    nodes = [n for contributed in hooks.mlk_graph_nodes(spec=spec) for n in (contributed or [])]
    return Graph(nodes)
