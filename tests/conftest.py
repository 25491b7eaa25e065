"""Shared fixtures: an isolated working directory and run store per test, and the CLI as a
real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory with its own ./specs and MLK_HOME; the repo is importable from it."""
    (tmp_path / "specs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLK_HOME", str(tmp_path / ".mlk"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("MLK_PLUGINS_LOCK", raising=False)
    monkeypatch.delenv("MLK_SPEC_PATH", raising=False)
    if str(ROOT) not in sys.path:
        monkeypatch.syspath_prepend(str(ROOT))
    from mlk.registry import reset_registry

    reset_registry()
    yield tmp_path
    reset_registry()


def mlk(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real `mlk` command; returns the finished process (stdout, stderr, returncode)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mlk", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


QUAD_SPEC = """\
seed: 1
framework: {name: python, function: "tests.kernel.trials:quadratic"}
data: {name: digits}
model: {name: digits_mlp}
hyperparameters:
  x: {type: double, minval: 0, maxval: 1}
searcher: {name: random, metric: loss, mode: min, max_trials: 6, max_resource: 3}
resources: {max_concurrent_trials: 2}
reproducibility: {deterministic: true}
"""


@pytest.fixture
def quad_spec(workdir: Path) -> Path:
    """A fast spec (a Python trial function, real processes and checkpoints) named `quad`."""
    path = workdir / "specs" / "quad.yaml"
    path.write_text(QUAD_SPEC)
    return path


# The example third-party distribution's own tests run (installed) from test_thirdparty.py.
collect_ignore = ["thirdparty"]
