"""End-to-end runs through the real CLI: search, record, reuse, resume after SIGKILL, reproduce."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import mlk


def _runs(workdir: Path) -> list[dict]:
    proc = mlk("runs", "list", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_run_records_trials_best_and_checkpoints(workdir: Path, quad_spec: Path) -> None:
    proc = mlk("run", "+spec=quad", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "best trial" in proc.stdout and "checkpoint: file://" in proc.stdout
    assert "search: 6 done" in proc.stderr
    (run,) = _runs(workdir)
    assert run["status"] == "completed"
    show = json.loads(mlk("runs", "show", run["id"], "--json", cwd=workdir).stdout)
    assert len(show["trials"]) == 6 and all(t["status"] == "completed" for t in show["trials"])
    best = min(show["trials"], key=lambda t: t["value"])
    assert show["summary"]["best_trial"] == best["trial_id"]
    ckpt = show["summary"]["checkpoint"]
    assert Path(ckpt.removeprefix("file://"), "MANIFEST.json").is_file()
    # retention: trial_latest=1 and trial_best=1 keep only the final checkpoint of each trial here
    assert all(len(t["checkpoints"]) == 1 for t in show["trials"])
    prov = show["provenance"]
    for key in ("python", "packages", "git", "hardware", "seeds", "plugins", "data", "threads"):
        assert key in prov
    assert prov["packages"]["mlk-kernel"] == "0.1.0"
    assert len(prov["data"]["fingerprint"]) == 64
    text = mlk("runs", "show", run["id"][:14], cwd=workdir)
    assert text.returncode == 0 and "provenance" in text.stdout and "x" in text.stdout


def test_second_run_reuses_completed_nodes(workdir: Path, quad_spec: Path) -> None:
    assert mlk("run", "+spec=quad", cwd=workdir).returncode == 0
    graph = mlk("graph", "+spec=quad", cwd=workdir)
    assert graph.returncode == 0 and "reuse from quad-" in graph.stdout
    second = mlk("run", "+spec=quad", cwd=workdir)
    assert second.returncode == 0
    assert "search: reused from run" in second.stderr
    fresh = mlk("run", "+spec=quad", "--fresh", cwd=workdir)
    assert "search: 6 done" in fresh.stderr
    changed = mlk("graph", "+spec=quad", "searcher.max_trials=7", cwd=workdir)
    assert "search [search]" in changed.stdout and "to run" in changed.stdout


def test_graph_runs_nothing(workdir: Path, quad_spec: Path) -> None:
    proc = mlk("graph", "+spec=quad", "--json", cwd=workdir)
    assert proc.returncode == 0
    nodes = json.loads(proc.stdout)["nodes"]
    assert [n["id"] for n in nodes] == ["data", "search", "select"]
    assert nodes[1]["inputs"] == ["data"]
    assert not (workdir / ".mlk" / "store").exists()


def _metric_rows(home: Path) -> list[tuple]:
    db = sqlite3.connect(home / "mlk.db")
    try:
        return db.execute("SELECT trial_id, resource, metrics_json, time FROM metrics ORDER BY trial_id, resource"
                          ).fetchall()
    finally:
        db.close()


def _processes_in(folder: Path) -> list[int]:
    """PIDs of live processes whose working directory is ``folder`` (this test's workers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if Path(os.readlink(proc / "cwd")) == folder:
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.parametrize("how", ["same command", "runs resume"])
def test_sigkill_mid_search_resumes_without_redoing_work(workdir: Path, quad_spec: Path, how: str) -> None:
    env = {**os.environ, "MLK_TEST_EPOCH_SECONDS": "0.4"}
    driver = subprocess.Popen([sys.executable, "-m", "mlk", "run", "+spec=quad", "-q"], cwd=workdir, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    home = workdir / ".mlk"
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = []
        if (home / "mlk.db").exists():
            try:
                rows = _metric_rows(home)
            except sqlite3.OperationalError:  # the file is there, its tables not yet
                pass
        if rows:
            done = {t for t, r, *_ in rows if r == 3}
            if len(done) >= 2 and len(rows) > 6:
                break
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # the orphaned workers see the driver gone, finish their epoch and exit: nothing is left behind
    deadline = time.time() + 30
    while _processes_in(workdir) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_in(workdir), "workers of the killed driver are still running"
    before = {(t, r): (m, ts) for t, r, m, ts in _metric_rows(home)}
    if how == "same command":
        resumed = mlk("run", "+spec=quad", cwd=workdir, env={"MLK_TEST_EPOCH_SECONDS": "0"})
    else:
        (killed,) = _runs(workdir)
        assert killed["status"] == "running"  # what the record says of a driver that was SIGKILLed
        resumed = mlk("runs", "resume", killed["id"], cwd=workdir, env={"MLK_TEST_EPOCH_SECONDS": "0"})
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming quad-" in resumed.stderr
    after = {(t, r): (m, ts) for t, r, m, ts in _metric_rows(home)}
    # nothing reported before the kill was computed again: same values, same timestamps
    for key, value in before.items():
        assert after[key] == value, f"trial {key[0]} epoch {key[1]} was recomputed"
    assert len(after) == 18
    (run,) = _runs(workdir)
    assert run["status"] == "completed"
    # and the resumed search ends exactly where an uninterrupted one does
    other = workdir / "other"
    other.mkdir()
    (other / "specs").mkdir()
    (other / "specs" / "quad.yaml").write_text(quad_spec.read_text())
    assert mlk("run", "+spec=quad", cwd=other, env={"MLK_HOME": str(other / ".mlk")}).returncode == 0
    straight = {(t, r): m for t, r, m, _ in _metric_rows(other / ".mlk")}
    assert {k: v[0] for k, v in after.items()} == straight


def test_reproduce_reports_identical_results(workdir: Path, quad_spec: Path) -> None:
    assert mlk("run", "+spec=quad", cwd=workdir).returncode == 0
    (run,) = _runs(workdir)
    proc = mlk("reproduce", run["id"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "results identical: all 18 trial reports match" in proc.stdout
    assert len(_runs(workdir)) == 2


def test_reproduce_reports_differences(workdir: Path, quad_spec: Path) -> None:
    assert mlk("run", "+spec=quad", cwd=workdir).returncode == 0
    (run,) = _runs(workdir)
    db = sqlite3.connect(workdir / ".mlk" / "mlk.db")
    db.execute("UPDATE metrics SET metrics_json = json_set(metrics_json, '$.loss', 123.0) WHERE trial_id = 2"
               " AND resource = 3")
    db.commit()
    db.close()
    proc = mlk("reproduce", run["id"], cwd=workdir)
    assert proc.returncode == 1
    assert "results differ: 1 report(s) differ" in proc.stdout and "trial 2 epoch 3: loss 123.0 ->" in proc.stdout


def test_failing_trials_are_retried_then_recorded(workdir: Path, quad_spec: Path) -> None:
    proc = mlk("run", "+spec=quad", "framework.function=tests.kernel.trials:crash", "searcher.max_trials=2",
               cwd=workdir)
    assert proc.returncode != 0
    assert "this trial always crashes" in proc.stderr
    show = json.loads(mlk("runs", "show", _runs(workdir)[0]["id"], "--json", cwd=workdir).stdout)
    assert [t["status"] for t in show["trials"]] == ["failed", "failed"]
    assert "RuntimeError: this trial always crashes" in show["trials"][0]["error"]


def test_worker_death_is_retried_from_checkpoint(workdir: Path, quad_spec: Path) -> None:
    proc = mlk("run", "+spec=quad", "framework.function=tests.kernel.trials:crash_once", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "trial 2 failed, retrying from its checkpoint" in proc.stderr
    rows = _metric_rows(workdir / ".mlk")
    assert len(rows) == 18


def test_model_target_builds_a_user_model_with_hparams(workdir: Path) -> None:
    proc = mlk("run", "+spec=digits_random", "~model.name", "~model.dropout",
               "+model._target_=tests.kernel.models:tiny_mlp", "searcher.max_trials=1", "searcher.max_resource=1",
               "resources.max_concurrent_trials=1", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    (run,) = _runs(workdir)
    show = json.loads(mlk("runs", "show", run["id"], "--json", cwd=workdir).stdout)
    assert show["spec"]["model"] == {"_target_": "tests.kernel.models:tiny_mlp", "hidden": "${hp.hidden}"}
    assert show["summary"]["best_metrics"]["val_accuracy"] > 0.3


def test_plain_function_trial_from_the_working_directory_needs_no_data(workdir: Path) -> None:
    (workdir / "my_trials.py").write_text(
        "def parabola(ctx):\n"
        "    for epoch in range(1, ctx.target + 1):\n"
        "        ctx.report(epoch, {'loss': (ctx.hparams['x'] - 2.0) ** 2 / epoch})\n")
    (workdir / "specs" / "fn.yaml").write_text(
        "framework: {name: python, function: 'my_trials:parabola'}\n"
        "hyperparameters: {x: {type: double, minval: 0, maxval: 4}}\n"
        "searcher: {name: random, metric: loss, max_trials: 4, max_resource: 2}\n")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # the repo only, not the workdir
    proc = mlk("run", "+spec=fn", cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr
    show = json.loads(mlk("runs", "show", _runs(workdir)[0]["id"], "--json", cwd=workdir, env=env).stdout)
    assert [n["node_id"] for n in show["nodes"]] == ["search", "select"]
    assert len(show["trials"]) == 4 and "data" not in show["provenance"]


def test_all_trials_failing_stops_the_search_early(workdir: Path, quad_spec: Path) -> None:
    proc = mlk("run", "+spec=quad", "framework.function=tests.kernel.trials:crash", "searcher.max_trials=50",
               cwd=workdir)
    assert proc.returncode == 1
    assert "trials so far failed; stopping the search" in proc.stderr
    show = json.loads(mlk("runs", "show", _runs(workdir)[0]["id"], "--json", cwd=workdir).stdout)
    assert len(show["trials"]) < 10


def test_larger_budget_extends_the_search_reusing_finished_trials(workdir: Path, quad_spec: Path) -> None:
    assert mlk("run", "+spec=quad", cwd=workdir).returncode == 0
    before = {(t, r): ts for t, r, _, ts in _metric_rows(workdir / ".mlk")}
    proc = mlk("run", "+spec=quad", "searcher.max_trials=9", "resources.max_concurrent_trials=1", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "continuing run quad-" in proc.stderr and "searcher.max_trials: 6 -> 9" in proc.stderr
    assert len(_runs(workdir)) == 1  # the same run, extended
    after = {(t, r): ts for t, r, _, ts in _metric_rows(workdir / ".mlk")}
    assert len(after) == 27 and all(after[k] == v for k, v in before.items())
    # the same 9 trials as a search that had max_trials=9 from the start
    other = workdir / "other"
    (other / "specs").mkdir(parents=True)
    (other / "specs" / "quad.yaml").write_text(quad_spec.read_text())
    assert mlk("run", "+spec=quad", "searcher.max_trials=9", cwd=other, env={"MLK_HOME": str(other / ".mlk")}
               ).returncode == 0
    straight = {(t, r): m for t, r, m, _ in _metric_rows(other / ".mlk")}
    assert {(t, r): m for t, r, m, _ in _metric_rows(workdir / ".mlk")} == straight


def test_resume_refuses_changes_that_invalidate_trials(workdir: Path, quad_spec: Path) -> None:
    assert mlk("run", "+spec=quad", cwd=workdir).returncode == 0
    (run,) = _runs(workdir)
    proc = mlk("runs", "resume", run["id"], "hyperparameters.x.maxval=2", "searcher.metric=acc_sum", cwd=workdir)
    assert proc.returncode == 2
    assert "cannot continue with this spec" in proc.stderr
    assert "hyperparameters.x.maxval: 1 -> 2" in proc.stderr and "searcher.metric: 'loss' -> 'acc_sum'" in proc.stderr
    ok = mlk("runs", "resume", run["id"], "searcher.max_trials=7", cwd=workdir)
    assert ok.returncode == 0, ok.stderr
    show = json.loads(mlk("runs", "show", run["id"], "--json", cwd=workdir).stdout)
    assert len(show["trials"]) == 7 and show["status"] == "completed"
