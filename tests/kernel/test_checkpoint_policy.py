"""When a trial saves (``ctx.checkpoint_due``) and which saved report ``select`` picks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mlk.graph import Node
from mlk.stages import select
from mlk.store import RunStore
from mlk.trial import TrialContext, TrialTask


def context(every: float | None, target: int = 10) -> TrialContext:
    storage: dict[str, Any] = {"name": "local"}
    if every is not None:
        storage["checkpoint_every_s"] = every
    spec = {"framework": {"name": "python", "function": "x:y"}, "searcher": {"metric": "loss"}, "storage": storage}
    task = TrialTask(run_id="r", trial_id=1, hparams={}, seed=0, target=target, spec=spec, home="/nonexistent")
    return TrialContext(task, store=None, storage=None, hooks=None)


def test_due_at_the_target_and_on_stop_only_within_the_interval() -> None:
    ctx = context(every=None, target=5)  # the default: 30 s
    assert ctx.checkpoint_every_s == 30.0
    assert [e for e in range(1, 6) if ctx.checkpoint_due(e)] == [5]
    ctx.request_stop()
    assert ctx.checkpoint_due(2)


def test_due_once_the_interval_has_passed() -> None:
    ctx = context(every=30, target=100)
    assert not ctx.checkpoint_due(3)
    ctx._last_save -= 31  # 31 s since the request began (or the last save)
    assert ctx.checkpoint_due(4)


def test_zero_interval_saves_every_epoch() -> None:
    ctx = context(every=0, target=100)
    assert all(ctx.checkpoint_due(e) for e in range(1, 5))


def _select(store: RunStore) -> dict[str, Any]:
    node = Node(id="select", kind="select", run="mlk.stages.select:run", config={"metric": "loss", "mode": "min"})
    return select.run(node, SimpleNamespace(store=store, outputs={"search": {"run_id": "r"}}))


def test_select_picks_the_best_saved_report(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.create_run("r", "s", "h", {})
    for trial, losses in ((1, [0.9, 0.2, 0.5]), (2, [0.8, 0.4, 0.3])):
        store.upsert_trial("r", trial, {"t": trial}, 0, "completed", 3)
        for epoch, loss in enumerate(losses, 1):
            store.record_metrics("r", trial, epoch, {"loss": loss}, loss)
        store.add_checkpoint("r", trial, 3, f"file:///ckpt/{trial}/3", {"files": {}}, losses[-1])
    # Trial 1's best report (0.2 at epoch 2) was never saved: trial 2 at epoch 3 is the best saved one.
    summary = _select(store)
    assert (summary["best_trial"], summary["best_resource"], summary["best_value"]) == (2, 3, 0.3)
    assert summary["checkpoint"] == "file:///ckpt/2/3" and summary["checkpoint_resource"] == 3
    # Once it is saved, it wins.
    store.add_checkpoint("r", 1, 2, "file:///ckpt/1/2", {"files": {}}, 0.2)
    summary = _select(store)
    assert (summary["best_trial"], summary["checkpoint"]) == (1, "file:///ckpt/1/2")


def test_select_without_checkpoints_takes_the_best_report(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.create_run("r", "s", "h", {})
    store.upsert_trial("r", 1, {}, 0, "completed", 2)
    store.record_metrics("r", 1, 1, {"loss": 0.5}, 0.5)
    store.record_metrics("r", 1, 2, {"loss": float("nan")}, float("nan"))
    summary = _select(store)
    assert (summary["best_trial"], summary["best_value"], summary["checkpoint"]) == (1, 0.5, None)
