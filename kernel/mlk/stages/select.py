"""The ``select`` node: the best trial of the search, its metrics and its best checkpoint."""

from __future__ import annotations

from typing import Any

from mlk.errors import MlkError
from mlk.graph import Node


def run(node: Node, ctx: Any) -> dict[str, Any]:
    search = ctx.outputs["search"]
    source_run = search["run_id"]
    metric, mode = node.config["metric"], node.config["mode"]
    sign = 1.0 if mode == "min" else -1.0
    best = None
    for m in ctx.store.metrics(source_run):
        value = m["metrics"].get(metric)
        if value is None or value != value:  # NaN never wins
            continue
        if best is None or sign * value < sign * best["value"]:
            best = {"trial_id": m["trial_id"], "resource": m["resource"], "value": value, "metrics": m["metrics"]}
    if best is None:
        raise MlkError(f"no trial of run {source_run} reported '{metric}'; nothing to select")
    ckpts = [c for c in ctx.store.checkpoints(source_run, best["trial_id"])]
    at = [c for c in ckpts if c["resource"] == best["resource"]]
    chosen = at[0] if at else (ckpts[-1] if ckpts else None)
    trial = next(t for t in ctx.store.trials(source_run) if t["trial_id"] == best["trial_id"])
    summary = {
        "run_id": source_run,
        "metric": metric,
        "mode": mode,
        "best_trial": best["trial_id"],
        "best_value": best["value"],
        "best_resource": best["resource"],
        "best_metrics": best["metrics"],
        "hparams": trial["hparams"],
        "checkpoint": chosen["uri"] if chosen else None,
        "checkpoint_resource": chosen["resource"] if chosen else None,
    }
    return summary
