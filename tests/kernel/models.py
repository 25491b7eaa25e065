"""A user model for `model._target_` tests: any callable taking the model options (and `meta`)."""

from __future__ import annotations

from typing import Any


def tiny_mlp(hidden: int, meta: dict[str, Any]) -> Any:
    import torch.nn as nn

    return nn.Sequential(nn.Linear(meta["input_shape"][0], hidden), nn.Tanh(), nn.Linear(hidden, meta["num_classes"]))
