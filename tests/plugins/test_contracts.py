"""Every builtin plugin passes its group's conformance suite, exactly as a third party's would."""

from __future__ import annotations

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
