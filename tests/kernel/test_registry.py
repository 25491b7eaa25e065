"""Plugin discovery: metadata first, one import per plugin, failures contained and named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlk.errors import PluginError
from mlk.registry import Registry
from tests.conftest import ROOT, mlk


def fake_distribution(site: Path, name: str, entry_points: str, modules: dict[str, str]) -> None:
    """Write an installed distribution as pip would: a package plus its .dist-info metadata."""
    info = site / f"{name.replace('-', '_')}-0.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.9\n")
    (info / "entry_points.txt").write_text(entry_points)
    for rel, text in modules.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def broken_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    fake_distribution(site, "mlk-broken", "[mlk.searchers]\nexploding = broken_pkg.searcher:Nope\n"
                      "[mlk.storage]\nnotaclass = broken_pkg.storage:VALUE\n",
                      {"broken_pkg/__init__.py": "", "broken_pkg/searcher.py": "raise ImportError('kaboom')\n",
                       "broken_pkg/storage.py": "VALUE = 3\n"})
    fake_distribution(site, "mlk-dupe", "[mlk.searchers]\nrandom = dupe_pkg:Random\n", {"dupe_pkg/__init__.py": ""})
    monkeypatch.syspath_prepend(str(site))
    return site


def test_broken_plugin_is_reported_not_fatal(workdir: Path, broken_site: Path) -> None:
    proc = mlk("plugins", "list", "--json", cwd=workdir, env={"PYTHONPATH": f"{broken_site}:{ROOT}"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    rows = {f"{p['group']}/{p['name']}": p for p in data["plugins"]}
    assert rows["searchers/exploding"]["status"] == "broken"
    assert "kaboom" in rows["searchers/exploding"]["detail"]
    assert rows["storage/notaclass"]["status"] == "broken"
    assert "not a subclass of mlk.storage.Storage" in rows["storage/notaclass"]["detail"]
    assert rows["searchers/grid"]["status"] == "ok"
    randoms = [p for p in data["plugins"] if p["group"] == "searchers" and p["name"] == "random"]
    assert {p["distribution"] for p in randoms} == {"mlk-kernel", "mlk-dupe"}
    assert all(p["status"] == "broken" and "duplicate plugin name 'random'" in p["detail"] for p in randoms)
    assert any("duplicate plugin name 'random'" in p and "mlk-dupe" in p for p in data["problems"])


def test_broken_plugin_named_when_used(workdir: Path, broken_site: Path, quad_spec: Path) -> None:
    reg = Registry()
    with pytest.raises(PluginError) as info:
        reg.get("searchers", "exploding", where="searcher.name")
    assert "searchers/exploding (distribution mlk-broken)" in str(info.value)
    proc = mlk("run", "+spec=quad", "searcher.name=exploding", cwd=workdir,
               env={"PYTHONPATH": f"{broken_site}:{ROOT}"})
    assert proc.returncode == 1 and "mlk-broken" in proc.stderr and "kaboom" in proc.stderr
    ok = mlk("graph", "+spec=quad", "searcher.name=single", cwd=workdir, env={"PYTHONPATH": f"{broken_site}:{ROOT}"})
    assert ok.returncode == 0, ok.stderr  # unrelated plugins keep working


def test_duplicate_name_is_an_error_naming_both(workdir: Path, broken_site: Path) -> None:
    reg = Registry()
    (problem,) = [p for p in reg.problems if "duplicate" in p]
    assert "mlk_plugins.searchers.random:RandomSearcher" in problem and "dupe_pkg:Random" in problem
    with pytest.raises(PluginError) as info:
        reg.get("searchers", "random", where="searcher.name")
    assert "mlk-dupe" in str(info.value) and "mlk-kernel" in str(info.value)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


HEAVY = {"torch", "tensorflow", "jax", "sklearn", "numpy", "ray", "mlflow", "onnxruntime"}


def test_import_mlk_and_help_import_no_framework(workdir: Path) -> None:
    assert not HEAVY & _modules_after("import mlk")
    assert not (HEAVY | {"pydantic", "hydra"}) & _modules_after(
        "import mlk.cli, contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        mlk.cli.main(['--help'])\n    except SystemExit:\n        pass")


def test_plugins_list_imports_no_framework(workdir: Path) -> None:
    mods = _modules_after("import mlk.cli, contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n"
                          "    mlk.cli.main(['plugins', 'list'])")
    assert not HEAVY & mods, HEAVY & mods


def test_trace_plugins_shows_hook_calls(workdir: Path, quad_spec: Path) -> None:
    proc = mlk("graph", "+spec=quad", cwd=workdir, env={"MLK_TRACE_PLUGINS": "1"})
    assert proc.returncode == 0
    assert "[mlk-trace]" in proc.stderr and "mlk_graph_nodes" in proc.stderr


def test_missing_requirement_is_unavailable_with_install_hint(workdir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site2"
    fake_distribution(site, "mlk-needs", "[mlk.frameworks]\nneedy = needy_pkg:Needy\n",
                      {"needy_pkg/__init__.py": "from mlk.framework import Framework\n"
                       "class Needy(Framework):\n    '''needs a library that is not installed'''\n"
                       "    name = 'needy'\n    requires = ('no_such_library_xyz',)\n    extra = 'needy'\n"})
    proc = mlk("plugins", "list", "--json", cwd=workdir, env={"PYTHONPATH": f"{site}:{ROOT}"})
    (row,) = [p for p in json.loads(proc.stdout)["plugins"] if p["name"] == "needy"]
    assert row["status"] == "unavailable"
    assert "no_such_library_xyz" in row["detail"] and 'pip install "mlk-needs[needy]"' in row["detail"]
