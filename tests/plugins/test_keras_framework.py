"""The keras framework plugin: real training of the digits MLP through the kernel, resume, export."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")
pytest.importorskip("sklearn")

from mlk.testing.framework import FrameworkContract

SECTIONS = {
    "framework": {"name": "keras", "optimizer": "adam", "lr": "${hp.lr}", "batch_size": 64},
    "data": {"name": "digits"},
    "model": {"name": "digits_mlp", "hidden": "${hp.hidden}", "dropout": 0.1},
    "hyperparameters": {"lr": {"type": "log", "minval": -3, "maxval": -2},
                        "hidden": {"type": "int", "minval": 16, "maxval": 32}},
    "searcher": {"name": "single", "metric": "val_loss", "max_resource": 3},
}


class TestKerasFramework(FrameworkContract):
    plugin = "keras"
    sections = SECTIONS
    hparams = {"lr": 0.005, "hidden": 24}
