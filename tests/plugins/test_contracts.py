"""Every builtin plugin passes its group's conformance suite, exactly as a third party's would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlk.testing.backend import BackendContract
from mlk.testing.framework import FrameworkContract
from mlk.testing.searcher import SearcherContract
from mlk.testing.storage import StorageContract


class TestSingleSearcher(SearcherContract):
    plugin = "single"


class TestGridSearcher(SearcherContract):
    plugin = "grid"


class TestRandomSearcher(SearcherContract):
    plugin = "random"


class TestLocalStorage(StorageContract):
    plugin = "local"


class TestLocalBackend(BackendContract):
    plugin = "local"


class TestPythonFramework(FrameworkContract):
    plugin = "python"
    sections = {
        "framework": {"name": "python", "function": "mlk.testing.trials:counter"},
        "searcher": {"name": "single", "metric": "loss", "max_resource": 3},
    }
    hparams = {"x": 0.25}


class TestTorchFramework(FrameworkContract):
    plugin = "torch"
    sections = {
        "framework": {"name": "torch", "optimizer": "adam", "lr": "${hp.lr}", "batch_size": 64},
        "data": {"name": "digits"},
        "model": {"name": "digits_mlp", "hidden": "${hp.hidden}", "dropout": 0.1},
        "hyperparameters": {"lr": {"type": "log", "minval": -3, "maxval": -2},
                            "hidden": {"type": "int", "minval": 16, "maxval": 32}},
        "searcher": {"name": "single", "metric": "val_loss", "max_resource": 3},
    }
    hparams = {"lr": 0.005, "hidden": 24}


class TestHyperbandSearcher(SearcherContract):
    plugin = "hyperband"


class TestAshaSearcher(SearcherContract):
    plugin = "asha"


class TestAshaBracketsSearcher(SearcherContract):
    plugin = "asha"
    config = {"brackets": 2}


class TestPbtSearcher(SearcherContract):
    plugin = "pbt"
    config = {"population": 4, "interval": 3}


class TestNevergradSearcher(SearcherContract):
    plugin = "nevergrad"
    config = {"optimizer": "TwoPointsDE"}


_PRELOAD_SCRIPT = """
import sys
from pathlib import Path
from tests.plugins.test_contracts import TestLocalBackend

suite = TestLocalBackend()
backend, (spec, store) = suite.setup_run(Path(sys.argv[1]), function="mlk.testing.trials:preloaded")
backend.preload_modules = tuple(sys.argv[2:])
backend.start()
try:
    backend.submit(suite.task(spec, store, 1, target=1))
    (result,) = suite.collect(backend, 1)
finally:
    backend.shutdown()
print(result.error or result.metrics["loss"])
"""


@pytest.mark.parametrize("preload", [True, False])
def test_local_backend_imports_preload_modules_once_before_the_workers_fork(tmp_path: Path, preload: bool) -> None:
    # a fresh interpreter: the fork server is started once per process, with the preload of that moment
    module = "xml.dom.minidom"
    args = [sys.executable, "-c", _PRELOAD_SCRIPT, str(tmp_path), *([module] if preload else [])]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2],
                          env={**os.environ, "MLK_TEST_PRELOADED": module})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == ("0.0" if preload else "1.0")
