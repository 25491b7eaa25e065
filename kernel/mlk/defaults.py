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
        *_compile_nodes(spec),
    ]


def _compile_nodes(spec: Any) -> list[Node]:
    """Export, then each compile step with its validate node, then each deploy node (whose target may
    add compile steps)."""
    if not spec["compile"] and not spec["deploy"]:
        return []
    from mlk.registry import registry
    from mlk.stages.compile import EXPORT, plan_steps
    from mlk.stages.deploy import plan_deploys

    data = ["data"] if spec["data"] is not None else []
    nodes = [Node(id=EXPORT, kind="export", run="mlk.stages.export:run", inputs=["select"],
                  config={"framework": spec["framework"]["name"]},
                  describe="the selected trial's model at its best checkpoint, as the framework exports it")]
    reg = registry()
    steps = plan_steps(spec, reg)
    deploys = plan_deploys(spec, reg, steps)
    for step in steps:
        why = f" (inserted: {step.inserted_for} needs {' or '.join(step.needs)})" if step.inserted_for else ""
        if step.stands_in_for:
            why += f" (stands in for {step.stands_in_for}, which does not take {step.source_format})"
        cls = reg.get("compilers", step.config["name"], where="compile.name")
        config: dict[str, Any] = {"step": step.config, "input": step.input}
        describe = cls(cls.Config.model_validate(step.config)).describe(step.source_format) + why
        if step.unreachable:
            config["unreachable"] = step.unreachable
            describe = f"{step.config['name']}: unavailable: {step.unreachable}"
        nodes.append(Node(id=step.node_id, kind="compile", run="mlk.stages.compile:run",
                          config=config, inputs=[step.input, *data], describe=describe))
        nodes.append(Node(id=f"validate/{step.id}", kind="validate", run="mlk.stages.validate:run",
                          config={"artifact": step.node_id, "compiler": step.config["name"],
                                  "validate": spec["validate"]},
                          inputs=[EXPORT, step.node_id, *data],
                          describe=f"accuracy, output difference, latency, size and memory of {step.id}"))
    return [*nodes, *deploys]


@hookimpl(trylast=True)
def mlk_trial_threads(cpus: int, concurrent_trials: int, slots_per_trial: int) -> int:
    return max(1, cpus // max(1, concurrent_trials * slots_per_trial))


@hookimpl(trylast=True)
def mlk_provenance(spec: Any) -> dict[str, Any]:
    from mlk.provenance import environment

    return environment()
