"""``deploy/<id>`` nodes: a target's bundle built from the run's validated artifacts, checked, stored,
registered as a new version of a named model and promoted.

Planning: each entry of ``deploy:`` takes the artifacts of the formats its target accepts. When no
compile step makes one, the kernel inserts the shortest chain of compile steps (and their
validate nodes) that does; a target that bundles every format it accepts (``every_format``, e.g.
mobile: TFLite and CoreML) gets a chain for each missing format. The node's inputs are those
compile and validate nodes, as *optional* inputs: an artifact that failed its gates or cannot run
here is left out rather than blocking the deployment of the others.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlk.compiler import Unavailable
from mlk.errors import PluginError, UserError
from mlk.graph import Node
from mlk.stages.artifacts import best_trial_context, fetch_artifact, store_artifact
from mlk.stages.compile import EXPORT, Step, chain_to, plan_steps
from mlk.target import BundleRefused, DeployInputs, Target
from mlk.trial import derive_seed

#: Training inputs the drift reference is computed on (at most).
REFERENCE_EXAMPLES = 2000


def plan_deploys(spec: Any, reg: Any, steps: list[Step]) -> list[Node]:
    """The deploy nodes of ``spec``; compile steps a target needs are appended to ``steps``."""
    fw = reg.get("frameworks", spec["framework"]["name"], where="framework.name")
    data = ["data"] if spec["data"] is not None else []
    nodes = []
    for j, cfg in enumerate(spec["deploy"]):
        where = f"deploy[{j}]"
        cls = reg.get("targets", cfg["name"], where=f"{where}.name")
        node_id = f"deploy/{cfg.get('id') or cfg['name']}"
        have = {fw.export_format, *(s.produces for s in steps if not s.unreachable)}
        if cls.every_format:
            wanted = [(f,) for f in cls.accepts if f not in have]
        else:
            wanted = [] if have & set(cls.accepts) else [tuple(cls.accepts)]
        for formats in wanted:
            chain = chain_to(spec, reg, steps, formats)
            if chain is None:
                if cls.every_format and have & set(cls.accepts):
                    continue  # the bundle goes without this format; the others are there
                raise UserError(f"target {cls.name} needs {' or '.join(formats)}, and no installed compiler makes "
                                f"that from {', '.join(sorted(have))}", where=where,
                                hint="`mlk plugins list` shows the compilers")
            added = plan_steps(spec, reg, wanted=[{"name": chain[-1]}], after=steps, inserted_for=node_id,
                               where=where)
            for step in added:
                step.inserted_for, step.needs = node_id, formats
            steps.extend(added)
            have |= {s.produces for s in added}
        # In the order the artifacts are made: the trained model first, then each step's.
        candidates: list[dict[str, Any]] = [
            {"artifact": EXPORT, "validate": None, "format": fw.export_format}
        ] if fw.export_format in cls.accepts else []
        candidates += [{"artifact": s.node_id, "validate": f"validate/{s.id}", "format": s.produces}
                       for s in steps if s.produces in cls.accepts and not s.unreachable]
        model = cfg.get("model") or spec.name
        target = cls(cls.Config.model_validate(cfg))
        optional = [c[k] for c in candidates for k in ("artifact", "validate") if c[k] and c[k] != EXPORT]
        promote = cfg["promote"] + (f" {cfg['canary_percent']:g}%" if cfg["promote"] == "canary" else "")
        nodes.append(Node(
            id=node_id, kind="deploy", run="mlk.stages.deploy:run",
            config={"target": cfg, "model": model, "candidates": candidates,
                    "validate": {k: spec["validate"][k] for k in ("split", "threads", "max_metric_drop")}},
            inputs=[EXPORT, *optional, *data], optional=optional,
            describe=f"{target.describe([f for f in cls.accepts if any(c['format'] == f for c in candidates)])}; "
                     f"a new version of model '{model}' "
                     f"(promote: {promote})"))
    return nodes


def run(node: Node, ctx: Any) -> dict[str, Any]:
    from mlk.deployments import Registry
    from mlk.stages.validate import GateFailed

    cfg = node.config["target"]
    cls = ctx.registry.get("targets", cfg["name"], where=f"{node.id}.name")
    reason = cls.unavailable_reason()
    if reason:
        raise Unavailable(reason)
    target: Target = cls(cls.Config.model_validate(cfg))
    work = Path(tempfile.mkdtemp(prefix="mlk-deploy-"))
    try:
        chosen, validation, left_out = _choose(node, ctx, cls)
        if not chosen:
            detail = "; ".join(f"{val} {status}" + (f" ({error})" if error else "") for val, status, error in left_out)
            message = (f"no artifact in a format {cls.name} accepts ({', '.join(cls.accepts)}) passed validation: "
                       f"{detail or 'the run made none'}")
            if any(status == "failed" for _, status, _ in left_out):
                raise GateFailed(node.id, [message], {"left_out": [list(x) for x in left_out]})
            raise Unavailable(message)
        artifacts = {}
        for fmt, (candidate, facts) in chosen.items():
            artifact = fetch_artifact(ctx, ctx.outputs[candidate["artifact"]], work / f"artifact-{fmt}")
            artifact.meta["validation"] = facts
            artifacts[fmt] = artifact
        inputs = _inputs(node, ctx, validation, work)
        out = work / "bundle"
        out.mkdir()
        bundle = target.build(artifacts, out, inputs)
        if bundle.format != f"bundle.{cls.name}":
            raise PluginError("targets", cls.name, cls.distribution,
                              f"build returned a bundle of format '{bundle.format}', not 'bundle.{cls.name}'")
        try:
            check = target.check(bundle, inputs)
        except BundleRefused as e:
            raise GateFailed(node.id, [f"{cls.name} refused the bundle: {f}" for f in e.failures],
                             {"check": e.report, "artifacts": {f: c["artifact"] for f, (c, _) in chosen.items()}}) \
                from None
        outputs = store_artifact(ctx, node.id, bundle)
        used = {fmt: candidate["artifact"] for fmt, (candidate, _) in chosen.items()}
        registry = Registry(ctx.store.home)
        try:
            version = registry.register(
                node.config["model"], ctx.run_id, cls.name, bundle.path, bundle.format,
                {**bundle.meta, "check": check, "artifacts": used, "uri": outputs["uri"], "node": node.id,
                 "spec": ctx.spec.name})
            promoted = _promote(registry, version.name, version.version, cfg, ctx)
        finally:
            registry.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ctx.store.add_event(ctx.run_id, "deployed", {"node": node.id, "model": version.name, "version": version.version,
                                                  "target": cls.name, "promoted": promoted})
    ctx.say(f"{node.id}: model [bold]{version.name}[/] version {version.version} ({promoted}), "
            f"{outputs['size_bytes'] / 1e6:.2f} MB at {version.bundle} (artifacts offered: "
            f"{', '.join(used.values())})")
    return {**outputs, "model": version.name, "version": version.version, "target": cls.name,
            "bundle": str(version.bundle), "promoted": promoted, "check": check, "artifacts": used}


def _choose(node: Node, ctx: Any,
            cls: type[Target]) -> tuple[dict[str, Any], dict[str, Any], list[tuple[str, str, str]]]:
    """For each accepted format, the latest artifact whose validation passed (or, for formats the
    target takes unvalidated, that could not be validated here); the validation reports; and the
    validate nodes of the candidates left out, with their status and error."""
    chosen: dict[str, Any] = {}
    validation: dict[str, Any] = {}
    left_out: list[tuple[str, str, str]] = []
    for candidate in reversed(node.config["candidates"]):
        fmt, art, val = candidate["format"], candidate["artifact"], candidate["validate"]
        if val is None:
            facts: dict[str, Any] = {"status": "reference", "note": "the trained model itself"}
            if art in ctx.outputs and fmt not in chosen:
                chosen[fmt] = (candidate, facts)
            continue
        report = ctx.outputs.get(val)
        if report is not None:
            validation[art] = report
            if fmt not in chosen:
                keys = ("accuracy", "reference_accuracy", "accuracy_drop", "max_output_diff", "top1_agreement")
                chosen[fmt] = (candidate, {"status": "passed", "node": val, **{k: report[k] for k in keys}})
            continue
        row = ctx.store.node(ctx.run_id, val) or {}
        status = row.get("status", "not run")
        if row.get("outputs"):
            validation[art] = row["outputs"]
        left_out.append((val, status, row.get("error") or ""))
        if status == "unavailable" and fmt in cls.accepts_unvalidated and art in ctx.outputs and fmt not in chosen:
            chosen[fmt] = (candidate, {"status": "not validated", "node": val, "reason": row.get("error", "")})
    ordered = {fmt: chosen[fmt] for fmt in cls.accepts if fmt in chosen}
    return ordered, validation, left_out


def _inputs(node: Node, ctx: Any, validation: dict[str, Any], work: Path) -> DeployInputs:
    """The dataset, the drift reference (training inputs and the trained model's outputs on them),
    labels and validation reports."""
    from mlk.drift import reference_stats
    from mlk.stages.validate import measure_export

    cfg = node.config["validate"]
    splits = best_trial_context(ctx).load_data() if ctx.spec["data"] is not None else None
    reference: dict[str, Any] = {}
    labels = None
    if splits is not None:
        import numpy as np

        x = np.ascontiguousarray(splits.train[0][:REFERENCE_EXAMPLES], dtype=np.float32)
        got = measure_export(ctx, f"train[:{REFERENCE_EXAMPLES}]", work, x, 1, cfg["threads"], [], 0, 1, False)
        reference = reference_stats(x, got["outputs"], layout=splits.meta.get("layout"))
        classes = splits.meta.get("classes")
        labels = [str(c) for c in classes] if classes else None
    return DeployInputs(data=splits, reference=reference, labels=labels, threads=cfg["threads"],
                        seed=derive_seed(ctx.spec["seed"], node.id), validation=validation,
                        max_metric_drop=cfg["max_metric_drop"], split=cfg["split"])


def _promote(registry: Any, name: str, version: int, cfg: dict[str, Any], ctx: Any) -> str:
    if cfg["promote"] == "none":
        return "registered, not promoted"
    routing = registry.routing(name)
    rollback = cfg.get("auto_rollback")
    if cfg["promote"] == "canary" and routing.production is not None:
        registry.promote(name, version, canary_percent=cfg["canary_percent"], auto_rollback=rollback)
        return f"canary, {cfg['canary_percent']:g}% of traffic"
    registry.promote(name, version, auto_rollback=rollback)
    if cfg["promote"] == "canary":
        ctx.say(f"[yellow]model {name} had no production version: version {version} becomes production, not a "
                "canary[/]")
    return "production"


def deploy_run(run_ref: str, target: str, model: str | None, quiet: bool = False) -> str:
    """Run the ``target`` deploy node(s) of a finished run, adding a ``deploy:`` entry to its spec when
    it has none for ``target`` (and ``model``); everything upstream is reused. Returns the run id."""
    import copy

    from mlk.registry import registry
    from mlk.runner import execute
    from mlk.spec import recorded_spec_path, validate_spec
    from mlk.store import RunStore, pid_alive

    store = RunStore()
    run = store.run(run_ref)
    if run["status"] == "running" and run["host"] == os.uname().nodename and pid_alive(run["pid"]):
        raise UserError(f"run {run['id']} is still running (driver PID {run['pid']}); deploy it when it has finished",
                        where="mlk deploy")
    select = store.node(run["id"], "select")
    if select is None or select["status"] != "done":
        raise UserError(f"run {run['id']} has not finished its search (status {run['status']}), so it has no model "
                        "to deploy", where="mlk deploy", hint=f"finish it first: `mlk runs resume {run['id']}`")
    registry().entry("targets", target, where="--target")
    data = copy.deepcopy(run["spec"])
    entries = data.setdefault("deploy", [])
    spec_name = run["spec_name"]

    def model_of(entry: dict[str, Any]) -> str:
        return str(entry.get("model") or spec_name)

    chosen = [e for e in entries if e["name"] == target and (model is None or model_of(e) == model)]
    if not chosen:
        entry: dict[str, Any] = {"name": target}
        taken = {model_of(e): e["name"] for e in entries}
        name = model or (spec_name if taken.get(spec_name, target) == target else f"{spec_name}-{target}")
        if name != spec_name:
            entry["model"] = name
        ids = {e.get("id") or e["name"] for e in entries}
        if target in ids:
            entry["id"] = f"{target}-{name}"
        entries.append(entry)
        chosen = [entry]
    spec = validate_spec(data, recorded_spec_path(run))
    nodes = [f"deploy/{e.get('id') or e['name']}" for e in chosen]
    return execute(spec, quiet=quiet, resume_run=run["id"], only=nodes)
