"""The ``torch`` artifact format: what the torch framework exports and torch-to-torch passes write.

A folder with:

- ``model.pt2``: the model as a ``torch.export`` ExportedProgram (eval mode, batch axis dynamic),
  loadable without the model's code; ONNX and CoreML conversion start from it.
- ``model.safetensors``: the weights, and ``module.json``: how to rebuild the ``nn.Module`` (the
  spec's ``model`` section with hyperparameters bound, the dataset ``meta``). :func:`load_module`
  rebuilds the module and fits it to the saved weights (pruned channels, folded batch norms), so
  passes can chain.
- ``artifact.json``: the :class:`mlk.compiler.Artifact` facts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mlk.compiler import Artifact
from mlk.trial import TrialContext, build_model

PROGRAM = "model.pt2"
WEIGHTS = "model.safetensors"
MODULE = "module.json"


def example_input(meta: dict[str, Any], batch: int = 2) -> torch.Tensor:
    return torch.zeros((batch, *meta["input_shape"]), dtype=torch.float32)


def write_artifact(module: nn.Module, out: Path, base: Artifact | None, meta: dict[str, Any],
                   rebuild: dict[str, Any], step: str) -> Artifact:
    """Save ``module`` as a torch artifact in ``out`` (exported program, weights, rebuild recipe)."""
    module = module.eval()
    example = example_input(meta)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(out / PROGRAM))
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    (out / MODULE).write_text(json.dumps(rebuild, indent=1, sort_keys=True))
    facts = {"input_name": "x", "output_name": "logits", "dtype": "float32", "file": PROGRAM,
             "parameters": sum(p.numel() for p in module.parameters())}
    artifact = (base.derive("torch", out, step, **facts) if base is not None
                else Artifact("torch", out, {**meta, **facts, "steps": [step]}))
    artifact.save_meta()
    return artifact


def export_trial(ctx: TrialContext, resource: int, out: Path) -> Artifact:
    """The trial's model at its checkpoint ``resource`` as a torch artifact (framework ``export``)."""
    from mlk_plugins.frameworks.torch import TorchConfig
    from mlk_plugins.frameworks.torch._impl import trial_for

    trial = trial_for(ctx, TorchConfig.model_validate(ctx.framework))
    trial.setup()
    with ctx.restore_checkpoint(resource) as found:
        if found is None:
            from mlk.errors import MlkError

            raise MlkError(f"trial {ctx.trial_id} has no checkpoint at {resource} epochs to export "
                           "(storage.keep.trial_best must keep it)")
        trial.load(found[0])
    meta: dict[str, Any] = {k: trial.meta[k] for k in ("input_shape", "num_classes", "layout") if k in trial.meta}
    meta.update({"trial_id": ctx.trial_id, "resource": resource, "classes": trial.meta.get("classes")})
    rebuild = {"model": ctx.model, "meta": trial.meta}
    return write_artifact(trial.module, out, None, meta, rebuild, f"export trial {ctx.trial_id} @ {resource}")


def load_module(artifact: Artifact) -> nn.Module:
    """Rebuild the ``nn.Module`` of a torch artifact (layers resized to the saved weights)."""
    from mlk.registry import registry
    from mlk_plugins.compilers.passes import load_resized

    recipe = json.loads((artifact.path / MODULE).read_text())
    module = build_model(registry(), recipe["model"], "torch", recipe["meta"])
    return load_resized(module, load_file(str(artifact.path / WEIGHTS))).eval()


def rebuild_recipe(artifact: Artifact) -> dict[str, Any]:
    return dict(json.loads((artifact.path / MODULE).read_text()))


def runner(artifact: Artifact, threads: int) -> Any:
    """Inference on a torch artifact: numpy batch in, numpy logits out."""
    import numpy as np

    torch.set_num_threads(max(1, threads))
    program = torch.export.load(str(artifact.path / PROGRAM)).module()

    def run(x: Any) -> Any:
        with torch.no_grad():
            return program(torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run
