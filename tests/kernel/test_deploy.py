"""Deployments: the model registry (versions, production, canary, rollback, history, monitor), deploy
nodes planned with the compile steps their targets need, optional inputs in the runner, the CLI's
errors, and `mlk deploy` on a finished digits run reusing its search."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from mlk.deployments import Registry
from mlk.errors import UserError
from mlk.hookspecs import hookimpl
from mlk.registry import registry
from tests.conftest import ROOT, mlk
from tests.kernel.test_registry import fake_distribution

# -- the registry ----------------------------------------------------------------------------------


def _bundle(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / f"bundle-{text}"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.bin").write_text(text)
    (folder / "sub" / "manifest.json").write_text(json.dumps({"text": text}))
    return folder


@pytest.fixture
def models(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "home")
    for i in (1, 2, 3):
        reg.register("digits", f"run{i}", "server", _bundle(tmp_path, f"v{i}"), "bundle.server", {"i": i})
    return reg


def test_register_copies_each_bundle_to_its_own_version_folder(models: Registry, tmp_path: Path) -> None:
    versions = models.versions("digits")
    assert [v.version for v in versions] == [1, 2, 3] and models.names() == ["digits"]
    v2 = models.get("digits", 2)
    assert v2.bundle == tmp_path / "home" / "models" / "digits" / "2" and v2.run_id == "run2"
    assert (v2.bundle / "model.bin").read_text() == "v2" and (v2.bundle / "sub" / "manifest.json").is_file()
    assert v2.meta == {"i": 2} and v2.format == "bundle.server" and v2.target == "server"
    assert not [p for p in (tmp_path / "home" / "models" / "digits").iterdir() if p.name.startswith(".")]
    assert models.by_run("run3")[0].version == 3 and models.by_run("run3", target="mobile") == []
    assert models.routing("digits").production is None  # registered is not serving


def test_promote_canary_and_rollback_in_order(models: Registry) -> None:
    assert models.promote("digits", 1).production.version == 1  # type: ignore[union-attr]
    assert models.promote("digits", 2).production.version == 2  # type: ignore[union-attr]
    canary = models.promote("digits", 3, canary_percent=25, auto_rollback={"max_error_rate": 0.1})
    assert canary.production.version == 2 and canary.canary.version == 3  # type: ignore[union-attr]
    assert canary.canary_percent == 25 and canary.auto_rollback == {"max_error_rate": 0.1}
    dropped = models.rollback("digits", reason="p99 too high")
    assert dropped.canary is None and dropped.canary_percent == 0 and dropped.production.version == 2  # type: ignore[union-attr]
    back = models.rollback("digits", reason="bad release")
    assert back.production.version == 1 and back.canary is None  # type: ignore[union-attr]
    with pytest.raises(UserError, match="only one production version"):
        models.rollback("digits")
    models.promote("digits", 3, canary_percent=5)
    full = models.promote("digits", 3)  # the canary becomes production
    assert full.production.version == 3 and full.canary is None  # type: ignore[union-attr]
    actions = [(h["action"], h["version"], h["previous"], h["reason"]) for h in models.history("digits")[3:]]
    assert actions == [("production", 1, None, ""), ("production", 2, 1, ""), ("canary", 3, None, "25% of traffic"),
                       ("rollback canary", 2, 3, "p99 too high"), ("rollback", 1, 2, "bad release"),
                       ("canary", 3, None, "5% of traffic"), ("production", 3, 1, "")]
    assert models.routing("digits").changed >= models.history("digits")[-1]["time"]


class _Watcher:
    """A tracker plugin: records every ``mlk_deployment_changed`` call; ``fail`` makes it raise."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, int, str, dict[str, Any]]] = []
        self.fail = fail

    @hookimpl
    def mlk_deployment_changed(self, model: str, version: int, action: str, routing: dict[str, Any]) -> None:
        self.calls.append((model, version, action, routing))
        if self.fail:
            raise RuntimeError("tracker is down")


def test_every_routing_change_calls_mlk_deployment_changed(models: Registry, capsys: Any) -> None:
    watcher = _Watcher()
    registry().register(watcher, name="test-watcher")
    try:
        models.promote("digits", 1)
        models.promote("digits", 2, canary_percent=20)
        models.rollback("digits", reason="errors")
        models.promote("digits", 2)
        models.rollback("digits")
    finally:
        registry().pm.unregister(name="test-watcher")
    assert watcher.calls == [
        ("digits", 1, "production", {"production": 1, "canary": None, "canary_percent": 0.0}),
        ("digits", 2, "canary", {"production": 1, "canary": 2, "canary_percent": 20.0}),
        ("digits", 2, "rollback canary", {"production": 1, "canary": None, "canary_percent": 0.0}),
        ("digits", 2, "production", {"production": 2, "canary": None, "canary_percent": 0.0}),
        ("digits", 1, "rollback", {"production": 1, "canary": None, "canary_percent": 0.0}),
    ]
    failing = _Watcher(fail=True)
    registry().register(failing, name="test-failing")
    try:
        assert models.promote("digits", 3).production.version == 3  # type: ignore[union-attr]
    finally:
        registry().pm.unregister(name="test-failing")
    assert "mlk_deployment_changed hook failed (RuntimeError: tracker is down)" in capsys.readouterr().err
    assert models.routing("digits").production.version == 3  # type: ignore[union-attr]


def test_mistakes_are_user_errors_naming_the_choices(models: Registry, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no model 'digit'") as unknown:
        models.routing("digit")
    assert "did you mean 'digits'" in unknown.value.render()
    with pytest.raises(UserError, match="has no version 7") as version:
        models.promote("digits", 7)
    assert "valid choices: 1, 2, 3" in version.value.render()
    with pytest.raises(UserError, match="no production version"):
        models.promote("digits", 2, canary_percent=10)
    models.promote("digits", 2)
    with pytest.raises(UserError, match="already production"):
        models.promote("digits", 2, canary_percent=10)
    with pytest.raises(UserError, match="between 0 and 100"):
        models.promote("digits", 3, canary_percent=100)
    with pytest.raises(UserError, match="holds server bundles, not mobile ones"):
        models.register("digits", "run9", "mobile", _bundle(tmp_path, "m"), "bundle.mobile", {})
    with pytest.raises(UserError, match="must be letters, digits"):
        models.register("../evil", "run9", "server", _bundle(tmp_path, "e"), "bundle.server", {})


def test_monitor_rows_are_newest_first_and_bounded(models: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlk.deployments

    monkeypatch.setattr(mlk.deployments, "MONITOR_KEEP", 5)
    for i in range(8):
        models.record_monitor("digits", 1 + i % 2, {"input_psi": i / 10, "requests": i})
    rows = models.monitor("digits", limit=50)
    assert len(rows) == 5 and [r["scores"]["requests"] for r in rows] == [7, 6, 5, 4, 3]
    assert [r["version"] for r in rows[:2]] == [2, 1]
    assert models.monitor("digits", limit=2)[1]["scores"]["input_psi"] == 0.6


def test_tables_are_added_to_a_store_made_before_them(tmp_path: Path) -> None:
    from mlk.store import RunStore

    RunStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "mlk.db")
    for table in ("model_versions", "model_routing", "model_history", "model_monitor"):
        db.execute(f"DROP TABLE {table}")
    db.execute("PRAGMA user_version = 0")  # what a store of an earlier version holds
    db.commit()
    db.close()
    reg = Registry(tmp_path)
    assert reg.names() == []
    assert reg.register("m", "r", "jetson", _bundle(tmp_path, "x"), "bundle.jetson", {}).version == 1


# -- planning ----------------------------------------------------------------------------------------

TORCH_SPEC = """\
defaults:
  - digits_base
  - _self_
searcher: {name: random, max_trials: 1, max_resource: 1}
validate: {repeats: 3, warmup: 1, batch_sizes: [1]}
"""


def _plan(workdir: Path, extra: str) -> dict[str, dict]:
    from mlk.graph import plan
    from mlk.registry import registry
    from mlk.spec import load_spec

    (workdir / "specs" / "dt.yaml").write_text(TORCH_SPEC + extra)
    graph = plan(load_spec(["+spec=dt"]), registry().hooks)
    return {n["id"]: n for n in graph.to_dict()}


def test_a_target_gets_the_compile_steps_its_formats_need(workdir: Path) -> None:
    nodes = _plan(workdir, "deploy:\n  - {name: jetson}\n")
    assert "(inserted: deploy/jetson needs onnx)" in nodes["compile/onnx"]["describe"]
    assert nodes["validate/onnx"]["inputs"] == ["export", "compile/onnx", "data"]
    deploy = nodes["deploy/jetson"]
    assert deploy["optional"] == ["compile/onnx", "validate/onnx"] and "export" in deploy["inputs"]
    assert deploy["config"]["model"] == "dt" and deploy["config"]["candidates"] == [
        {"artifact": "compile/onnx", "validate": "validate/onnx", "format": "onnx"}]
    assert "promote: production" in deploy["describe"]


def test_every_format_targets_get_a_chain_per_format_sharing_steps(workdir: Path) -> None:
    nodes = _plan(workdir, "deploy:\n  - {name: jetson, model: dj}\n  - {name: mobile, model: dm, promote: canary}\n")
    compiles = [n for n in nodes if n.startswith("compile/")]
    assert compiles == ["compile/onnx", "compile/tflite", "compile/coreml"]  # one onnx step serves both
    assert "(inserted: deploy/mobile needs tflite)" in nodes["compile/tflite"]["describe"]
    assert [c["format"] for c in nodes["deploy/mobile"]["config"]["candidates"]] == ["tflite", "coreml"]
    assert "promote: canary 10%" in nodes["deploy/mobile"]["describe"]


def test_a_spec_step_of_an_accepted_format_is_used_not_duplicated(workdir: Path) -> None:
    nodes = _plan(workdir, "compile:\n  - {name: onnxruntime}\ndeploy:\n  - {name: jetson}\n")
    assert [n for n in nodes if n.startswith("compile/")] == ["compile/onnx", "compile/onnxruntime"]
    assert "(inserted: onnxruntime needs onnx)" in nodes["compile/onnx"]["describe"]
    assert [c["artifact"] for c in nodes["deploy/jetson"]["config"]["candidates"]] == ["compile/onnx"]


def test_adding_a_deploy_section_keeps_every_other_key(workdir: Path) -> None:
    before = _plan(workdir, "compile:\n  - {name: onnx}\n")
    after = _plan(workdir, "compile:\n  - {name: onnx}\ndeploy:\n  - {name: jetson}\n")
    assert {n: before[n]["key"] for n in before} == {n: after[n]["key"] for n in before}


@pytest.mark.parametrize(("extra", "message"), [
    ("deploy:\n  - {name: jetsn}\n", "deploy[0].name: unknown target 'jetsn'"),
    ("deploy:\n  - {name: jetson, precison: fp16}\n", "deploy[0].precison: unknown key"),
    ("deploy:\n  - {name: mobile, canary_percent: 0}\n", "deploy[0].canary_percent"),
    ("deploy:\n  - {name: jetson}\n  - {name: mobile}\n", "model 'bad' is also deployed by deploy[0] (target jetson)"),
    ("deploy:\n  - {name: jetson, model: a}\n  - {name: jetson, model: b}\n",
     "two deploy entries have the id 'jetson'"),
    ("deploy:\n  - {name: jetson, model: 'a b'}\n", "deploy[0].model: model name 'a b' must be"),
])
def test_bad_deploy_entries_are_user_errors(workdir: Path, extra: str, message: str) -> None:
    (workdir / "specs" / "bad.yaml").write_text(TORCH_SPEC + extra)
    proc = mlk("graph", "+spec=bad", cwd=workdir)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_each_format_gets_its_latest_validated_artifact() -> None:
    from types import SimpleNamespace

    from mlk.graph import Node
    from mlk.stages.deploy import _choose
    from mlk.target import Target

    class Phone(Target):
        """Takes onnx, torch and coreml; coreml even unvalidated."""

        name = "phone"
        accepts = ("coreml", "onnx", "torch")
        accepts_unvalidated = ("coreml",)

    recorded = {"validate/late": {"status": "failed", "error": "missed max_metric_drop", "outputs": {"accuracy": 0.1}},
                "validate/ios": {"status": "unavailable", "error": "needs macOS", "outputs": None}}
    report = {"accuracy": 0.9, "reference_accuracy": 0.91, "accuracy_drop": 0.01, "max_output_diff": 1e-6,
              "top1_agreement": 0.99}
    ctx = SimpleNamespace(run_id="r", store=SimpleNamespace(node=lambda run, node_id: recorded.get(node_id)),
                          outputs={"export": {}, "compile/early": {}, "validate/early": report, "compile/late": {},
                                   "compile/ios": {}})
    candidates = [{"artifact": "export", "validate": None, "format": "torch"},
                  {"artifact": "compile/early", "validate": "validate/early", "format": "onnx"},
                  {"artifact": "compile/late", "validate": "validate/late", "format": "onnx"},
                  {"artifact": "compile/ios", "validate": "validate/ios", "format": "coreml"}]
    node = Node(id="deploy/phone", kind="deploy", run="x:y", config={"candidates": candidates})
    chosen, validation, left_out = _choose(node, ctx, Phone)
    assert list(chosen) == ["coreml", "onnx", "torch"]  # the target's order
    assert chosen["onnx"][0]["artifact"] == "compile/early" and chosen["onnx"][1]["status"] == "passed"
    assert chosen["coreml"][1] == {"status": "not validated", "node": "validate/ios", "reason": "needs macOS"}
    assert chosen["torch"][1]["status"] == "reference"
    assert validation == {"compile/early": report, "compile/late": {"accuracy": 0.1}}
    assert left_out == [("validate/ios", "unavailable", "needs macOS"),
                        ("validate/late", "failed", "missed max_metric_drop")]
    Phone.accepts_unvalidated = ()
    assert "coreml" not in _choose(node, ctx, Phone)[0]


# -- optional inputs in the runner ----------------------------------------------------------------------

OPTIONAL_NODES = '''
from mlk import hookimpl
from mlk.compiler import Unavailable
from mlk.graph import Node

@hookimpl
def mlk_graph_nodes(spec):
    return [Node(id="gpu", kind="t", run="optnodes:unavailable", inputs=["select"]),
            Node(id="cpu", kind="t", run="optnodes:value", inputs=["select"]),
            Node(id="bundle", kind="t", run="optnodes:bundle", inputs=["gpu", "cpu"], optional=["gpu", "cpu"]),
            Node(id="strict", kind="t", run="optnodes:bundle", inputs=["gpu", "cpu"])]

def unavailable(node, ctx):
    raise Unavailable("needs a GPU")

def value(node, ctx):
    return {"value": 3}

def bundle(node, ctx):
    return {"used": sorted(n for n in node.inputs if n in ctx.outputs)}
'''


def test_a_node_runs_without_its_optional_inputs_and_keys_what_it_missed(workdir: Path, quad_spec: Path,
                                                                          tmp_path: Path) -> None:
    site = tmp_path / "optsite"
    fake_distribution(site, "mlk-optnodes", "[mlk.hooks]\noptnodes = optnodes\n", {"optnodes.py": OPTIONAL_NODES})
    env = {"PYTHONPATH": f"{site}:{ROOT}"}
    planned = json.loads(mlk("graph", "+spec=quad", "--json", cwd=workdir, env=env).stdout)
    proc = mlk("run", "+spec=quad", cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(mlk("runs", "list", "--json", cwd=workdir, env=env).stdout)
    show = json.loads(mlk("runs", "show", runs[-1]["id"], "--json", cwd=workdir, env=env).stdout)
    nodes = {n["node_id"]: n for n in show["nodes"]}
    assert nodes["gpu"]["status"] == "unavailable" and nodes["strict"]["status"] == "skipped"
    assert nodes["bundle"]["status"] == "done"
    bundle_key = next(n["key"] for n in planned["nodes"] if n["id"] == "bundle")
    assert nodes["bundle"]["key"] != bundle_key  # not reusable where the GPU node completes
    from mlk.store import RunStore

    assert RunStore().node(runs[-1]["id"], "bundle")["outputs"] == {"used": ["cpu"]}  # type: ignore[index]


# -- the CLI ---------------------------------------------------------------------------------------------


def test_cli_errors_name_what_exists(workdir: Path, quad_spec: Path) -> None:
    reg = Registry()
    reg.register("digits", "r1", "jetson", _bundle(workdir, "1"), "bundle.jetson",
                 {"thresholds": {"input_psi": 0.2}})
    reg.promote("digits", 1)
    reg.record_monitor("digits", 1, {"input_psi": 0.5, "output_psi": 0.01})
    cases = [
        (("deploy", "nope", "--target", "jetson"), "no run 'nope'"),
        (("models", "list", "digit"), "did you mean 'digits'"),
        (("models", "promote", "digits", "4"), "model 'digits' has no version 4\n  valid choices: 1"),
        (("models", "promote", "digits", "1", "--canary", "20"), "already production"),
        (("models", "rollback", "digits"), "none to roll back to"),
        (("monitor", "nope"), "no model 'nope'"),
        (("serve", "nope"), "'nope' is neither a model in the registry nor a run"),
        (("serve", "digits"), "target 'jetson' builds bundles for a device; it does not serve"),
        (("serve", "digits", "--token-env", "MLK_TEST_UNSET_TOKEN"), "MLK_TEST_UNSET_TOKEN is not set"),
        (("serve", "digits", "--port", "70000"), "port 70000 is not between 1 and 65535"),
    ]
    for args, message in cases:
        proc = mlk(*args, cwd=workdir)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    quad = mlk("run", "+spec=quad", "-q", cwd=workdir)
    assert quad.returncode == 0, quad.stderr
    run_id = json.loads(mlk("runs", "list", "--json", cwd=workdir).stdout)[-1]["id"]
    proc = mlk("deploy", run_id, "--target", "jetsn", cwd=workdir)
    assert proc.returncode == 2 and "did you mean 'jetson'" in proc.stderr
    proc = mlk("deploy", run_id, "--target", "jetson", cwd=workdir)  # a python trial function exports nothing
    assert proc.returncode == 2 and "cannot export a model, so nothing can be deployed" in proc.stderr
    listed = mlk("models", "list", cwd=workdir)
    assert listed.returncode == 0 and "digits" in listed.stdout and "jetson" in listed.stdout
    monitor = mlk("monitor", "digits", cwd=workdir)
    assert monitor.returncode == 0 and "ALERT" in monitor.stdout and "input_psi" in monitor.stdout
    report = json.loads(mlk("monitor", "digits", "--json", cwd=workdir).stdout)["versions"][0]
    assert report["checks"]["input_psi"] == {"value": 0.5, "threshold": 0.2, "alert": True}
    assert report["checks"]["output_psi"]["alert"] is False and report["role"] == "production"


# -- end to end --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mlk_deploy_on_a_finished_run_reuses_its_search(workdir: Path) -> None:
    (workdir / "specs" / "dt.yaml").write_text(TORCH_SPEC)
    assert mlk("run", "+spec=dt", "-q", cwd=workdir).returncode == 0
    run_id = json.loads(mlk("runs", "list", "--json", cwd=workdir).stdout)[-1]["id"]
    from mlk.store import RunStore

    store = RunStore()
    search_done = store.node(run_id, "search")["finished"]  # type: ignore[index]
    metrics = store.metrics(run_id)
    proc = mlk("deploy", run_id, "--target", "jetson", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "deploy/jetson: model dt version 1 (production)" in proc.stderr and "compile/onnx" in proc.stderr
    assert store.node(run_id, "search")["finished"] == search_done and store.metrics(run_id) == metrics  # type: ignore[index]
    assert len(json.loads(mlk("runs", "list", "--json", cwd=workdir).stdout)) == 1
    version = Registry().get("dt", 1)
    manifest = json.loads((version.bundle / "manifest.json").read_text())
    from mlk.target import verify_checksums

    assert verify_checksums(version.bundle, manifest["files"]) == []
    assert version.meta["check"]["ran"] and version.meta["check"]["runtime"] == "onnxruntime"
    assert version.meta["artifacts"] == {"onnx": "compile/onnx"} and version.run_id == run_id
    show = json.loads(mlk("runs", "show", run_id, "--json", cwd=workdir).stdout)
    assert show["status"] == "completed" and show["spec"]["deploy"][0]["name"] == "jetson"
    assert show["deployments"][0]["version"] == 1 and show["summary"]["deployments"]["deploy/jetson"]["version"] == 1
    # the same deployment again: nothing to do, no new version
    again = mlk("deploy", run_id, "--target", "jetson", cwd=workdir)
    assert again.returncode == 0 and [v.version for v in Registry().versions("dt")] == [1]
    # the spec gains the same deploy section: every node, the deployment included, is reused
    (workdir / "specs" / "dt.yaml").write_text(TORCH_SPEC + "deploy:\n  - {name: jetson}\n")
    graph = mlk("graph", "+spec=dt", cwd=workdir)
    line = next(ln for ln in graph.stdout.splitlines() if "deploy/jetson" in ln and "[deploy]" in ln)
    assert f"reuse from {run_id}" in line
    rerun = mlk("run", "+spec=dt", cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr
    for node in ("search", "compile/onnx", "validate/onnx", "deploy/jetson"):
        assert f"{node}: reused from run {run_id}" in rerun.stderr
    assert [v.version for v in Registry().versions("dt")] == [1]
    # `mlk serve RUN`: the run has no server deployment yet, so it is deployed to `server`, then served
    pytest.importorskip("bentoml")
    import os
    import sys
    import urllib.request

    from benchmarks.serve.deployed import ServerProcess, free_port

    port = free_port()
    server = ServerProcess([sys.executable, "-m", "mlk", "serve", run_id, "--port", str(port)],
                           {**os.environ, "PYTHONPATH": str(ROOT)}, port, workdir / "serve.log")
    try:
        server.start(timeout=600)
        _, _, splits = _digits()
        request = urllib.request.Request(server.url + "/predict", method="POST",
                                         data=json.dumps({"inputs": splits.test[0][:5].tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            body = json.loads(reply.read())
    finally:
        left = server.stop()
    assert left == [], f"server processes left running: {left}"
    assert body["model"] == "dt-server" and body["version"] == "1" and len(body["predictions"]) == 5
    assert "deploy/server: model dt-server version 1 (production)" in server.log()
    versions = Registry().by_run(run_id)
    assert sorted((v.name, v.target) for v in versions) == [("dt", "jetson"), ("dt-server", "server")]


def _digits() -> tuple[None, None, Any]:
    from mlk_plugins.datasets.digits import DigitsDataset

    return None, None, DigitsDataset(DigitsDataset.Config(name="digits")).load()
