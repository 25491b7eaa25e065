"""The ``keras`` artifact format: what the keras framework exports.

A folder with ``model.keras`` (Keras 3's own format: the architecture as JSON and the weights;
loaded with ``safe_mode``, so no code runs) and ``artifact.json``. The model takes the dataset's
layout (``nchw`` images, flat vectors) and returns logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlk.compiler import Artifact
from mlk.errors import MlkError
from mlk_plugins._tensorflow import import_tensorflow

if TYPE_CHECKING:
    from mlk.trial import TrialContext
    from mlk_plugins.frameworks.keras import KerasConfig

FILE = "model.keras"


def export_trial(ctx: TrialContext, config: KerasConfig, resource: int, out: Path) -> Artifact:
    """The trial's model at its checkpoint ``resource`` as a keras artifact (framework ``export``)."""
    import_tensorflow()
    from mlk_plugins.frameworks.keras._impl import build_keras_model, load_model_weights

    data = ctx.load_data()
    model = build_keras_model(ctx)
    with ctx.restore_checkpoint(resource) as found:
        if found is None:
            raise MlkError(f"trial {ctx.trial_id} has no checkpoint at {resource} epochs to export "
                           "(storage.keep.trial_best must keep it)")
        load_model_weights(model, found[0], ctx.trial_id)
    model.save(str(out / FILE))
    meta = {k: data.meta[k] for k in ("input_shape", "num_classes", "layout") if k in data.meta}
    meta.update({"trial_id": ctx.trial_id, "resource": resource, "classes": data.meta.get("classes"),
                 "input_name": "x", "output_name": "logits", "dtype": "float32", "file": FILE,
                 "parameters": int(model.count_params()),
                 "steps": [f"export trial {ctx.trial_id} @ {resource}"]})
    artifact = Artifact("keras", out, meta)
    artifact.save_meta()
    return artifact


def load_keras(artifact: Artifact) -> Any:
    """The ``keras.Model`` of a keras artifact."""
    import_tensorflow()
    import keras

    if not artifact.file.is_file():
        raise MlkError(f"keras artifact {artifact.path} has no {artifact.meta.get('file')}")
    return keras.saving.load_model(str(artifact.file), compile=False, safe_mode=True)


def inference_function(model: Any, input_shape: list[int]) -> Any:
    """``model`` in inference mode as a ``tf.function`` over float32 batches of any size, input ``x``."""
    tf = import_tensorflow()
    spec = tf.TensorSpec([None, *(int(d) for d in input_shape)], tf.float32, name="x")
    return tf.function(lambda x: model(x, training=False), input_signature=[spec], autograph=False)


def runner(artifact: Artifact, threads: int) -> Any:
    """Inference on a keras artifact: numpy batch in, numpy logits out."""
    import numpy as np

    tf = import_tensorflow()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, threads))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already started in this process
        pass
    fn = inference_function(load_keras(artifact), artifact.meta["input_shape"])

    def run(x: Any) -> Any:
        return fn(tf.constant(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run
