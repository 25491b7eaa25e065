"""A throwaway third-party distribution (a searcher, a storage, a tracker and a spec) is installed
with pip and works with no change to kernel/: listed, conformant, and used by a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, mlk

EXAMPLE = ROOT / "tests" / "thirdparty" / "mlk-example-plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True, cwd=build,
                   env={**os.environ, "PIP_NO_INDEX": "1"})
    assert (target / "mlk_example_plugin-1.2.3.dist-info").is_dir()
    return target


def _env(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def test_listed_with_its_distribution(workdir: Path, installed: Path) -> None:
    proc = mlk("plugins", "list", "--json", cwd=workdir, env=_env(installed))
    rows = {f"{p['group']}/{p['name']}": p for p in json.loads(proc.stdout)["plugins"]}
    for key in ("searchers/sweep", "storage/flatdir", "hooks/jsonl-tracker", "specs/example"):
        assert rows[key]["distribution"] == "mlk-example-plugin" and rows[key]["version"] == "1.2.3"
        assert rows[key]["status"] == "ok"
    assert rows["searchers/random"]["status"] == "ok"  # builtins stay visible beside it


def test_passes_the_conformance_suites(workdir: Path, installed: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          cwd=workdir, env={**os.environ, **_env(installed)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout


def test_a_run_uses_its_spec_searcher_storage_and_tracker(workdir: Path, installed: Path) -> None:
    events = workdir / "events.jsonl"
    env = {**_env(installed), "MLK_EXAMPLE_EVENTS": str(events)}
    proc = mlk("run", "+spec=example_sweep", cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = [e["event"] for e in lines]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("trial_reported") == 10  # 5 trials x 2 epochs, from the worker processes
    assert {e["pid"] for e in lines if e["event"] == "trial_reported"} != {lines[0]["pid"]}
    show = json.loads(mlk("runs", "show", lines[0]["run_id"], "--json", cwd=workdir, env=env).stdout)
    xs = [t["hparams"]["x"] for t in show["trials"]]
    assert xs == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert show["summary"]["checkpoint"].startswith((workdir / ".mlk" / "flat").as_uri())
    assert show["provenance"]["example_tracker"]["events_file"] == str(events)
    assert any(p["plugin"] == "searchers/sweep" and p["version"] == "1.2.3" for p in show["provenance"]["plugins"])


def test_autoload_off_keeps_only_the_kernels_plugins(workdir: Path, installed: Path) -> None:
    env = {**_env(installed), "MLK_DISABLE_PLUGIN_AUTOLOAD": "1"}
    rows = json.loads(mlk("plugins", "list", "--json", cwd=workdir, env=env).stdout)["plugins"]
    assert {p["distribution"] for p in rows} == {"mlk-kernel"}
    assert {"searchers/random", "backends/local", "storage/local", "hooks/kernel"} <= {
        f"{p['group']}/{p['name']}" for p in rows}
    proc = mlk("run", "+spec=example_sweep", cwd=workdir, env=env)
    assert proc.returncode == 2 and "no spec named 'example_sweep'" in proc.stderr


def test_lock_pins_the_plugin_set(workdir: Path, installed: Path) -> None:
    lock = mlk("plugins", "lock", cwd=workdir)  # without the example plugin
    (workdir / "plugins.lock").write_text(lock.stdout)
    env = {**_env(installed), "MLK_PLUGINS_LOCK": str(workdir / "plugins.lock")}
    proc = mlk("run", "+spec=example_sweep", cwd=workdir, env=env)
    assert proc.returncode == 2
    assert "extra: searchers/sweep (mlk-example-plugin 1.2.3) is installed but not in the lock" in proc.stderr
    assert "extra: storage/flatdir" in proc.stderr
    full = mlk("plugins", "lock", cwd=workdir, env=_env(installed))
    data = json.loads(full.stdout)
    for p in data["plugins"]:
        if p["name"] == "sweep":
            p["version"] = "1.0.0"
        if p["name"] == "random":
            p["sha256"] = "0" * 64
    (workdir / "plugins.lock").write_text(json.dumps(data))
    proc = mlk("run", "+spec=example_sweep", cwd=workdir, env=env)
    assert proc.returncode == 2
    assert "changed: searchers/sweep version is '1.2.3', the lock says '1.0.0'" in proc.stderr
    assert "changed: searchers/random sha256" in proc.stderr
    (workdir / "plugins.lock").write_text(full.stdout)
    assert mlk("run", "+spec=example_sweep", cwd=workdir, env=env).returncode == 0


def test_allow_list_limits_what_loads(workdir: Path, installed: Path) -> None:
    env = _env(installed)
    proc = mlk("run", "+spec=example_sweep", "plugins.allow=[searchers/random,storage/*,frameworks/*,datasets/*,"
               "models/*,backends/*]", cwd=workdir, env=env)
    assert proc.returncode == 2
    assert "plugin searchers/sweep is not allowed by plugins.allow" in proc.stderr
