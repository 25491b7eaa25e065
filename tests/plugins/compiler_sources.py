"""Source artifacts for compiler tests: a real digits model, briefly trained, as a torch artifact."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=4)
def trained_digits(model: tuple[tuple[str, Any], ...], epochs: int = 3) -> tuple[Any, dict[str, Any], Any]:
    """``(module, meta, splits)``: ``model`` (a model section as sorted items) trained on digits."""
    import torch

    from mlk.registry import registry
    from mlk.trial import build_model
    from mlk_plugins.compilers.passes import finetune
    from mlk_plugins.datasets.digits import DigitsDataset

    splits = DigitsDataset(DigitsDataset.Config(name="digits")).load()
    if dict(model).get("name") != "digits_mlp":
        splits.train = (splits.train[0].reshape(-1, 1, 8, 8), splits.train[1])
        splits.val = (splits.val[0].reshape(-1, 1, 8, 8), splits.val[1])
        splits.test = (splits.test[0].reshape(-1, 1, 8, 8), splits.test[1])
        splits.meta = {**splits.meta, "input_shape": [1, 8, 8], "layout": "nchw"}
    torch.manual_seed(0)
    torch.set_num_threads(1)
    module = build_model(registry(), dict(model), "torch", splits.meta)
    finetune(module, *splits.train, epochs=epochs, lr=3e-3, batch_size=64, seed=0)
    return module.eval(), dict(splits.meta), splits


def torch_source(tmp_path: Path, model: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """``(artifact, reference runner, test inputs, test labels)`` for :class:`CompilerContract`."""
    from mlk_plugins.frameworks.torch.artifacts import runner, write_artifact

    module, meta, splits = trained_digits(tuple(sorted(model.items())))
    folder = tmp_path / "source"
    folder.mkdir()
    artifact = write_artifact(module, folder, None, meta, {"model": model, "meta": meta}, "test source")
    return artifact, runner(artifact, 1), splits.test[0], splits.test[1]
