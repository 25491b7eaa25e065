"""Hooks from an installed plugin: event subscribers, a kernel default overridden, and a new
run-graph node added without any change to the kernel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, mlk
from tests.kernel.test_registry import fake_distribution

HOOKS = '''
import json, os
from mlk import hookimpl
from mlk.graph import Node

def _log(**kw):
    with open(os.environ["HOOK_LOG"], "a") as f:
        f.write(json.dumps(kw) + "\\n")

@hookimpl
def mlk_trial_threads(cpus, concurrent_trials, slots_per_trial):
    _log(hook="mlk_trial_threads", cpus=cpus)
    return 1

@hookimpl
def mlk_checkpoint_saved(run_id, trial_id, resource, uri):
    _log(hook="mlk_checkpoint_saved", trial_id=trial_id, resource=resource, uri=uri)

@hookimpl
def mlk_trial_finished(run_id, trial_id, status, resource, metrics):
    _log(hook="mlk_trial_finished", trial_id=trial_id, status=status, resource=resource)

@hookimpl
def mlk_graph_nodes(spec):
    return [Node(id="summary", kind="report", run="hooky:write_summary", inputs=["select"],
                 config={"format": "json"}, describe="write the best trial to summary.json")]

def write_summary(node, ctx):
    best = ctx.outputs["select"]
    with open("summary.json", "w") as f:
        json.dump({"best_trial": best["best_trial"], "run": ctx.run_id}, f)
    return {"file": "summary.json"}
'''


@pytest.fixture
def hook_site(tmp_path: Path) -> Path:
    site = tmp_path / "hooksite"
    fake_distribution(site, "mlk-hooky", "[mlk.hooks]\nhooky = hooky\n", {"hooky.py": HOOKS})
    return site


def test_plugin_hooks_are_called_and_extend_the_graph(workdir: Path, quad_spec: Path, hook_site: Path) -> None:
    log = workdir / "hooks.jsonl"
    env = {"PYTHONPATH": f"{hook_site}:{ROOT}", "HOOK_LOG": str(log)}
    graph = mlk("graph", "+spec=quad", cwd=workdir, env=env)
    assert "summary [report]" in graph.stdout and "<- select" in graph.stdout
    proc = mlk("run", "+spec=quad", cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    hooks = [c["hook"] for c in calls]
    assert hooks.count("mlk_trial_threads") == 1
    assert hooks.count("mlk_checkpoint_saved") == 18  # 6 trials x 3 epochs, from worker processes
    finished = [c for c in calls if c["hook"] == "mlk_trial_finished"]
    assert len(finished) == 6 and {c["status"] for c in finished} == {"completed"}
    summary = json.loads((workdir / "summary.json").read_text())
    show = json.loads(mlk("runs", "show", summary["run"], "--json", cwd=workdir, env=env).stdout)
    assert summary["best_trial"] == show["summary"]["best_trial"]
    assert [n["node_id"] for n in show["nodes"]] == ["data", "search", "select", "summary"]
