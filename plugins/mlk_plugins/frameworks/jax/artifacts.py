"""The ``jax`` artifact format: what the jax framework exports.

A folder with:

- ``params.npz``: the parameter pytree's leaves in tree order (``v000``...), as in a checkpoint;
- ``module.json``: how to rebuild the ``flax.linen.Module`` (the spec's ``model`` section with
  hyperparameters bound, and the dataset ``meta``) and the leaves' paths;
- ``artifact.json``: the :class:`mlk.compiler.Artifact` facts.

Loading rebuilds the module through the model plugin and reads the arrays with
``allow_pickle=False``: nothing is unpickled. The model takes the dataset's layout and returns logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlk.compiler import Artifact
from mlk.errors import MlkError

if TYPE_CHECKING:
    from mlk.trial import TrialContext
    from mlk_plugins.frameworks.jax import JaxConfig

FILE = "params.npz"
MODULE = "module.json"


def export_trial(ctx: TrialContext, config: JaxConfig, resource: int, out: Path) -> Artifact:
    """The trial's model at its checkpoint ``resource`` as a jax artifact (framework ``export``)."""
    import shutil

    from mlk_plugins.frameworks.jax._impl import PARAMS_FILE, build_flax_model, flatten, init_params, load_params

    data = ctx.load_data()
    model = build_flax_model(ctx)
    params = init_params(model, ctx.seed, data.meta["input_shape"])
    with ctx.restore_checkpoint(resource) as found:
        if found is None:
            raise MlkError(f"trial {ctx.trial_id} has no checkpoint at {resource} epochs to export "
                           "(storage.keep.trial_best must keep it)")
        params = load_params(params, found[0], ctx.trial_id)  # checks the shapes
        shutil.copyfile(found[0] / PARAMS_FILE, out / FILE)
    leaves = flatten(params)
    recipe = {"model": ctx.model, "meta": data.meta, "params": [[p, list(a.shape)] for p, a in leaves]}
    (out / MODULE).write_text(json.dumps(recipe, indent=1, sort_keys=True, default=str))
    meta = {k: data.meta[k] for k in ("input_shape", "num_classes", "layout") if k in data.meta}
    meta.update({"trial_id": ctx.trial_id, "resource": resource, "classes": data.meta.get("classes"),
                 "input_name": "x", "output_name": "logits", "dtype": "float32", "file": FILE,
                 "parameters": int(sum(a.size for _, a in leaves)),
                 "steps": [f"export trial {ctx.trial_id} @ {resource}"]})
    artifact = Artifact("jax", out, meta)
    artifact.save_meta()
    return artifact


def load_flax(artifact: Artifact) -> tuple[Any, Any]:
    """``(module, params)`` of a jax artifact."""
    from mlk.registry import registry
    from mlk.trial import build_model
    from mlk_plugins.frameworks.jax._impl import init_params, read_tree

    if not (artifact.path / MODULE).is_file() or not (artifact.path / FILE).is_file():
        raise MlkError(f"jax artifact {artifact.path} needs {FILE} and {MODULE}")
    recipe = json.loads((artifact.path / MODULE).read_text())
    module = build_model(registry(), recipe["model"], "jax", recipe["meta"])
    like = init_params(module, 0, recipe["meta"]["input_shape"])
    return module, read_tree(like, artifact.path / FILE, "params")


def inference_function(artifact: Artifact) -> Any:
    """The artifact's model in inference mode as a function of a float32 batch, parameters bound."""
    module, params = load_flax(artifact)
    return lambda x: module.apply({"params": params}, x, train=False)


def runner(artifact: Artifact) -> Any:
    """Inference on a jax artifact: numpy batch in, numpy logits out (jitted; one compilation per batch size)."""
    import jax
    import numpy as np

    fn = jax.jit(inference_function(artifact))

    def run(x: Any) -> Any:
        return np.asarray(fn(np.ascontiguousarray(x, dtype=np.float32)))

    return run
