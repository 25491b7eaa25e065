"""The ``select`` node: the best trial of the search, its metrics and its best checkpoint."""

from __future__ import annotations

from typing import Any

from mlk.errors import MlkError
from mlk.graph import Node


def run(node: Node, ctx: Any) -> dict[str, Any]:
    """The best report of the search among those with a live checkpoint (so the exported model is
    one that was saved); when no report has one, the best report and its trial's latest checkpoint."""
    search = ctx.outputs["search"]
    source_run = search["run_id"]
    metric, mode = node.config["metric"], node.config["mode"]
    ckpts = ctx.store.checkpoints(source_run)
    saved = {(c["trial_id"], c["resource"]): c for c in ckpts}
    reports = ctx.store.metrics(source_run)
    best = _best(reports, metric, mode, saved) or _best(reports, metric, mode, None)
    if best is None:
        raise MlkError(f"no trial of run {source_run} reported '{metric}'; nothing to select")
    own = [c for c in ckpts if c["trial_id"] == best["trial_id"]]
    chosen = saved.get((best["trial_id"], best["resource"])) or (own[-1] if own else None)
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


def _best(reports: list[dict[str, Any]], metric: str, mode: str,
          saved: dict[tuple[int, int], Any] | None) -> dict[str, Any] | None:
    """The best report of ``metric`` (NaN never wins), among those in ``saved`` when given."""
    sign = 1.0 if mode == "min" else -1.0
    best = None
    for m in reports:
        value = m["metrics"].get(metric)
        if value is None or value != value or (saved is not None and (m["trial_id"], m["resource"]) not in saved):
            continue
        if best is None or sign * value < sign * best["value"]:
            best = {"trial_id": m["trial_id"], "resource": m["resource"], "value": value, "metrics": m["metrics"]}
    return best
