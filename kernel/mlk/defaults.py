"""The kernel's default hook implementations, registered like any plugin (entry point
``mlk.hooks: kernel``) and marked ``trylast`` so a plugin can override or extend each."""

from __future__ import annotations

from typing import Any

from mlk.graph import Node
from mlk.hookspecs import hookimpl


@hookimpl(trylast=True)
def mlk_graph_nodes(spec: Any) -> list[Node]:
    searcher = spec["searcher"]
    search_config = {
        "seed": spec["seed"],
        "searcher": searcher,
        "hyperparameters": spec.space.dump(),
        "framework": spec["framework"],
        "model": spec["model"],
        "data": spec["data"],
        "reproducibility": spec["reproducibility"],
    }
    nodes = []
    if spec["data"] is not None:
        nodes.append(Node(id="data", kind="data", run="mlk.stages.data:run", config={"data": spec["data"]},
                          volatile=True, describe=f"load and fingerprint dataset '{spec['data']['name']}'"))
    return [
        *nodes,
        Node(id="search", kind="search", run="mlk.stages.search:run", config=search_config,
             inputs=[n.id for n in nodes],
             describe=(f"{searcher['name']} search over {len(spec.space.params)} hyperparameters: up to "
                       f"{searcher['max_trials']} trials x {searcher['max_resource']} epochs, "
                       f"{spec.resources.max_concurrent_trials} at once on backend '{spec.resources.backend}'")),
        Node(id="select", kind="select", run="mlk.stages.select:run",
             config={"metric": searcher["metric"], "mode": searcher["mode"]}, inputs=["search"],
             describe=f"pick the trial with the {'lowest' if searcher['mode'] == 'min' else 'highest'} "
                      f"{searcher['metric']} and its checkpoint"),
    ]


@hookimpl(trylast=True)
def mlk_trial_threads(cpus: int, concurrent_trials: int, slots_per_trial: int) -> int:
    return max(1, cpus // max(1, concurrent_trials * slots_per_trial))


@hookimpl(trylast=True)
def mlk_provenance(spec: Any) -> dict[str, Any]:
    from mlk.provenance import environment

    return environment()
