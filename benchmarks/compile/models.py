"""The three benchmark models, trained briefly on real images, and their data.

- ``digits_mlp`` (hidden 64): scikit-learn's 8x8 handwritten digits as 64 flat features in [0, 1],
  the ``digits`` dataset plugin itself.
- ``cifar_cnn`` and ``resnet18`` (width 64, CIFAR stem) take 3x32x32 images. There is no CIFAR-10 on
  this machine (and no network), so they train on a real-image proxy that ships with scikit-learn:
  the same digits, upsampled bilinearly from 8x8 to 32x32 and copied to 3 channels (10 classes).

Every model uses the ``digits`` plugin's fixed 60/20/20 split (1078 / 359 / 360 images): it trains on
the train part, the pruning pass fine-tunes on it, static quantisation calibrates on it, and
accuracy is measured on the held-out test part. Latency does not depend on the data.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

#: Image side of the proxy for the CIFAR-shaped models.
SIDE = 32


@dataclass(frozen=True)
class ModelSpec:
    """How to build and train one benchmark model."""

    key: str
    section: dict[str, Any]          # the spec's ``model`` section
    images: bool                     # 3x32x32 proxy images, else flat digits
    steps: int                       # optimiser steps of the initial training
    batch_size: int
    lr: float
    repeats: int                     # timed calls per variant and batch size
    warmup: int                      # untimed calls per variant and batch size before timing
    prune_epochs: int = 2            # fine-tuning epochs after structured pruning
    notes: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    "digits_mlp": ModelSpec("digits_mlp", {"name": "digits_mlp", "hidden": 64}, images=False, steps=340,
                            batch_size=64, lr=3e-3, repeats=200, warmup=20, prune_epochs=3),
    "cifar_cnn": ModelSpec("cifar_cnn", {"name": "cifar_cnn"}, images=True, steps=300, batch_size=64, lr=1e-3,
                           repeats=200, warmup=10),
    "resnet18": ModelSpec("resnet18", {"name": "resnet18", "width": 64, "small_input": True}, images=True,
                          steps=200, batch_size=32, lr=1e-3, repeats=50, warmup=3),
}


def load_splits(images: bool) -> Any:
    """The digits splits (mlk's ``digits`` dataset plugin), as flat rows or as 3x32x32 proxy images."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mlk_plugins.datasets.digits import DigitsDataset

    splits = DigitsDataset(DigitsDataset.Config(name="digits")).load()
    if not images:
        return splits

    def upsample(x: Any) -> Any:
        t = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8)
        big = F.interpolate(t, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
        return np.ascontiguousarray(big.repeat(1, 3, 1, 1).numpy(), dtype=np.float32)

    splits.train = (upsample(splits.train[0]), splits.train[1])
    splits.val = (upsample(splits.val[0]), splits.val[1])
    splits.test = (upsample(splits.test[0]), splits.test[1])
    splits.meta = {**splits.meta, "input_shape": [3, SIDE, SIDE], "layout": "nchw",
                   "proxy": "sklearn digits 8x8, bilinear upsampled to 32x32, replicated to 3 channels"}
    return splits


def train(spec: ModelSpec, threads: int = 2, seed: int = 0, steps: int | None = None) -> dict[str, Any]:
    """Build ``spec``'s model through mlk's registry and train it with mlk's ``finetune`` (Adam, cross
    entropy) for about ``steps`` optimiser steps (whole epochs). Returns the module (eval mode), the
    splits, the meta for artifacts and what the training took."""
    import torch

    from mlk.registry import registry
    from mlk.trial import build_model
    from mlk_plugins.compilers.passes import evaluate, finetune

    splits = load_splits(spec.images)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    module = build_model(registry(), dict(spec.section), "torch", splits.meta)
    steps = spec.steps if steps is None else steps
    per_epoch = math.ceil(len(splits.train[1]) / spec.batch_size)
    epochs = max(1, round(steps / per_epoch))
    start = time.perf_counter()
    finetune(module, *splits.train, epochs=epochs, lr=spec.lr, batch_size=spec.batch_size, seed=seed)
    seconds = time.perf_counter() - start
    facts = {"epochs": epochs, "steps": epochs * per_epoch, "batch_size": spec.batch_size, "lr": spec.lr,
             "seconds": seconds, "val": evaluate(module, *splits.val), "test": evaluate(module, *splits.test),
             "parameters": sum(p.numel() for p in module.parameters())}
    meta = {k: splits.meta[k] for k in ("input_shape", "num_classes", "layout", "classes") if k in splits.meta}
    return {"module": module.eval(), "splits": splits, "meta": meta, "training": facts}
