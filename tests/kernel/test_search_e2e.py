"""Multi-fidelity and model-based searches end to end on real digits training."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import mlk


def _show(workdir: Path) -> dict:
    runs = json.loads(mlk("runs", "list", "--json", cwd=workdir).stdout)
    return json.loads(mlk("runs", "show", runs[-1]["id"], "--json", cwd=workdir).stdout)


def _reports(workdir: Path) -> list[tuple[int, int, float]]:
    db = sqlite3.connect(workdir / ".mlk" / "mlk.db")
    try:
        return db.execute("SELECT trial_id, resource, time FROM metrics ORDER BY time").fetchall()
    finally:
        db.close()


@pytest.mark.slow
def test_hyperband_promotes_from_checkpoints_and_reports_brackets(workdir: Path) -> None:
    proc = mlk("run", "+spec=digits_hb", "searcher.max_resource=9", "~deploy", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    show = _show(workdir)
    trials = {t["trial_id"]: t for t in show["trials"]}
    # R=9, eta=3: brackets of 9, 5 and 3 configurations
    assert len(trials) == 17
    assert {t["searcher"]["bracket"] for t in trials.values()} == {0, 1, 2}
    # each trial's epochs were reported once, in order: promotions continued from checkpoints
    per_trial: dict[int, list[int]] = {}
    for tid, resource, _ in _reports(workdir):
        per_trial.setdefault(tid, []).append(resource)
    for tid, resources in per_trial.items():
        assert resources == list(range(1, len(resources) + 1)), (tid, resources)
        assert trials[tid]["resource"] == len(resources)
    assert {t["status"] for t in trials.values()} == {"completed", "stopped"}
    assert sum(t["status"] == "completed" for t in trials.values()) == 5  # 1 + 1 + 3
    assert {d["decision"] for d in show["decisions"]} == {"promoted", "stopped"}
    text = mlk("runs", "show", show["id"], cwd=workdir).stdout
    assert "searcher decisions" in text and "bracket 2 @ 1 epochs: promoted" in text
    assert show["summary"]["best_metrics"]["val_accuracy"] > 0.9
    plot = mlk("runs", "plot", show["id"], "--out", str(workdir / "figs"), cwd=workdir)
    assert plot.returncode == 0, plot.stderr
    for name in ("learning_curves.png", "best_so_far.png"):
        data = (workdir / "figs" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.slow
def test_pbt_children_continue_from_their_parents(workdir: Path) -> None:
    proc = mlk("run", "+spec=digits_pbt", "searcher.max_resource=6", "searcher.population=4", "searcher.interval=2",
               cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    show = _show(workdir)
    children = [t for t in show["trials"] if t["parent"] is not None]
    assert len(children) == 2
    reports = _reports(workdir)
    for child in children:
        epochs = [r for t, r, _ in reports if t == child["trial_id"]]
        assert epochs[0] > 1, "a child starts where its parent's checkpoint is, not at epoch 1"
        assert child["searcher"] == {"parent": child["parent"]}
    assert show["summary"]["best_metrics"]["val_accuracy"] > 0.9


@pytest.mark.slow
def test_asha_and_nevergrad_runs(workdir: Path) -> None:
    proc = mlk("run", "+spec=digits_asha", "searcher.max_trials=9", "searcher.max_resource=9", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    show = _show(workdir)
    assert len(show["trials"]) == 9 and any(t["resource"] == 9 for t in show["trials"])
    proc = mlk("run", "+spec=digits_ng", "searcher.max_trials=6", "searcher.max_resource=2", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    show = _show(workdir)
    assert len(show["trials"]) == 6 and show["summary"]["best_metrics"]["val_accuracy"] > 0.8


@pytest.mark.slow
def test_cifar_hb_runs_on_a_small_archive_in_cifar_format(workdir: Path) -> None:
    from tests.plugins.test_datasets import write_archive

    archive = write_archive(workdir / "cifar-10-python.tar.gz", per_batch=40)
    proc = mlk("run", "+spec=cifar_hb", f"data.path={archive}", "searcher.max_resource=3",
               "hyperparameters.lr.minval=-3", "hyperparameters.lr.maxval=-1", "~deploy", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    show = _show(workdir)
    assert len(show["trials"]) == 5  # R=3, eta=3: brackets of 3 and 2 configurations
    assert show["spec"]["data"]["augment"]["horizontal_flip"] == "${hp.horizontal_flip}"
    flips = {t["hparams"]["horizontal_flip"] for t in show["trials"]}
    assert flips <= {True, False}
    assert show["provenance"]["data"]["sizes"]["test"] == 40
