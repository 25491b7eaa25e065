"""The ``export`` node: the selected trial's model, at its best checkpoint, as the framework's
artifact (the source of every compile step and the reference of every validation)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlk.graph import Node
from mlk.spec import validate_section
from mlk.stages.artifacts import best_trial_context, store_artifact


def run(node: Node, ctx: Any) -> dict[str, Any]:
    best = ctx.outputs["select"]
    trial_ctx = best_trial_context(ctx)
    cls = ctx.registry.get("frameworks", ctx.spec["framework"]["name"], where="framework.name")
    framework = cls(validate_section(cls.Config, trial_ctx.framework, "framework"))
    out = Path(tempfile.mkdtemp(prefix="mlk-export-"))
    try:
        resource = best["checkpoint_resource"] or best["best_resource"]
        artifact = framework.export(trial_ctx, resource, out)
        outputs = store_artifact(ctx, node.id, artifact)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    ctx.say(f"export: trial {best['best_trial']} @ {resource} epochs -> {artifact.format} "
            f"({outputs['size_bytes'] / 1e6:.2f} MB)")
    return outputs
