"""Moving artifacts between node executors and storage, and rebuilding the best trial's context."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mlk.compiler import Artifact
from mlk.spec import validate_section
from mlk.storage import get_dir, put_dir


def storage_of(ctx: Any) -> Any:
    cls = ctx.registry.get("storage", ctx.spec["storage"]["name"], where="storage.name")
    return cls(validate_section(cls.Config, ctx.spec["storage"], "storage"), ctx.store.home)


def store_artifact(ctx: Any, node_id: str, artifact: Artifact) -> dict[str, Any]:
    """Upload ``artifact`` (checksummed, manifest last); the node outputs that locate it."""
    storage = storage_of(ctx)
    artifact.save_meta()
    prefix = f"runs/{ctx.run_id}/artifacts/{node_id.replace('/', '--')}"
    storage.delete_prefix(prefix)
    manifest = put_dir(storage, artifact.path, prefix, {"format": artifact.format})
    size = sum(f["size"] for f in manifest["files"].values())
    return {"format": artifact.format, "prefix": prefix, "uri": storage.uri(prefix), "manifest": manifest,
            "meta": artifact.meta, "size_bytes": size}


def fetch_artifact(ctx: Any, outputs: dict[str, Any], dest: Path | None = None) -> Artifact:
    """Download an artifact stored by :func:`store_artifact` (sha256 verified) into a folder."""
    folder = dest or Path(tempfile.mkdtemp(prefix="mlk-artifact-"))
    get_dir(storage_of(ctx), outputs["prefix"], outputs["manifest"], folder)
    return Artifact.load(folder)


def best_trial_context(ctx: Any) -> Any:
    """A :class:`mlk.trial.TrialContext` for the selected trial (its sections, hyperparameters and
    checkpoints), for steps that rebuild or retrain its model."""
    from mlk.trial import TrialContext, TrialTask

    best = ctx.outputs["select"]
    trial = next(t for t in ctx.store.trials(best["run_id"]) if t["trial_id"] == best["best_trial"])
    task = TrialTask(run_id=best["run_id"], trial_id=trial["trial_id"], hparams=trial["hparams"], seed=trial["seed"],
                     target=trial["resource"], spec=ctx.spec.data, home=str(ctx.store.home))
    return TrialContext(task, ctx.store, storage_of(ctx), ctx.hooks)
