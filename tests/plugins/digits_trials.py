"""The trial request the data-parallel tests of every framework run: the digits MLP on 400 examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlk.store import RunStore
from mlk.testing import build_spec
from mlk.trial import TrialTask


def digits_task(home: Path, run_id: str, *, framework: str, slots: int, target: int, batch_size: int = 32,
                dropout: float = 0.0, trial: str | None = None, attempt: int = 0) -> tuple[TrialTask, RunStore]:
    """Trial 1 of run ``run_id`` in ``home``, recorded as running, trained to ``target`` epochs on
    ``slots`` processes; ``trial`` names a ``framework.trial`` class (``module:Class``)."""
    fw: dict[str, Any] = {"name": framework, "optimizer": "adam", "lr": 0.01, "batch_size": batch_size}
    if trial:
        fw["trial"] = trial
    spec = build_spec({
        "framework": fw, "data": {"name": "digits", "subset": 400},
        "model": {"name": "digits_mlp", "hidden": 24, "dropout": dropout},
        "searcher": {"name": "single", "metric": "val_loss", "max_resource": 4},
        "resources": {"slots_per_trial": slots},
        # A save every epoch: a trial killed in epoch e resumes from e - 1.
        "storage": {"name": "local", "path": str(home / "store"), "checkpoint_every_s": 0},
        "reproducibility": {"deterministic": True},
    }, home)
    store = RunStore(home)
    if not any(r["id"] == run_id for r in store.runs()):
        store.create_run(run_id, "ddp", spec.hash, spec.data)
    store.upsert_trial(run_id, 1, {}, 4321, "running", target)
    task = TrialTask(run_id=run_id, trial_id=1, hparams={}, seed=4321, target=target, spec=spec.data,
                     home=str(home), threads=1, attempt=attempt)
    return task, store
