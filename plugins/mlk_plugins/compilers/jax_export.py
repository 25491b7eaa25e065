"""``jax_tflite`` and ``jax_onnx``: a ``jax`` artifact to TFLite (through jax2tf) and to ONNX.

``jax_tflite`` converts the model's inference function with ``jax2tf`` (batch-polymorphic) and
TensorFlow's ``TFLiteConverter``, float or dynamic-range; its artifacts are ``tflite`` artifacts
like the ``tflite`` compiler's (same runner and facts), taking the dataset's layout.

``jax_onnx``: ONNX from JAX has no clean route on this stack. jax2tf writes an ``XlaCallModule``
op that tf2onnx cannot convert (jax 0.10 ignores ``native_serialization=False``), and jax2onnx
pins orbax-checkpoint below the version flax needs here. So it loads the JAX parameters into the
model plugin's Keras build of the same architecture (layer names, kernel layouts and flattening
order match: ``_flax_nets`` and ``_keras_nets``), checks the two agree on the artifact's inputs,
and exports that with Keras's ONNX exporter. A model without a Keras twin is reported
unavailable, with the reason.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, ClassVar

from mlk.compiler import Artifact, CompileInputs, Compiler, Runner, Unavailable
from mlk.errors import MlkError, UserError
from mlk_plugins._tensorflow import import_tensorflow
from mlk_plugins.compilers.keras_export import (
    INPUT,
    ONNX_FILE,
    OUTPUT,
    KerasOnnxConfig,
    NativeTflite,
    function_converter,
    keras_to_onnx,
    tflite_artifact,
)

#: Largest difference between the JAX model and its Keras twin that ``jax_onnx`` accepts.
TWIN_TOLERANCE = 1e-4


class JaxTflite(NativeTflite):
    """A jax artifact to TensorFlow Lite through jax2tf and TensorFlow's converter (float or dynamic range)."""

    name = "jax_tflite"
    accepts = ("jax",)
    requires = ("jax", "flax", "tensorflow", "ai_edge_litert")

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        from jax.experimental import jax2tf

        from mlk_plugins.frameworks.jax.artifacts import inference_function

        if self.config.quantize == "int8":
            raise UserError("jax_tflite makes float or dynamic-range models; full int8 needs a calibrated "
                            "TensorFlow graph, which jax2tf's XlaCallModule op does not give",
                            where="compile.quantize", hint="use quantize: dynamic, or the tflite compiler "
                                                           "(through ONNX) for int8")
        tf = import_tensorflow()
        shape = [int(d) for d in source.meta["input_shape"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = jax2tf.convert(inference_function(source), with_gradient=False,
                                       polymorphic_shapes=[f"(b, {', '.join(map(str, shape))})"])
        fn = tf.function(converted, autograph=False,
                         input_signature=[tf.TensorSpec([None, *shape], tf.float32, name=INPUT)])
        with tempfile.TemporaryDirectory(prefix="mlk-jax2tf-") as tmp:
            return tflite_artifact(self, source, out, inputs, function_converter(fn, Path(tmp)), "jax2tf")


class JaxOnnx(Compiler):
    """A jax artifact to ONNX through the model's Keras twin (the same architecture built for keras, given
    the JAX parameters and checked against JAX), exported by Keras: input ``x``, output ``logits``."""

    name = "jax_onnx"
    Config: ClassVar[type[KerasOnnxConfig]] = KerasOnnxConfig
    accepts = ("jax",)
    produces = "onnx"
    requires = ("jax", "flax", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime")
    extra = "keras"
    config: KerasOnnxConfig

    def describe(self, source_format: str) -> str:
        return f"{self.name}: {source_format} -> onnx (opset {self.config.opset}, through the model's Keras twin)"

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        import_tensorflow()
        model = keras_twin(source, inputs.calibration)
        keras_to_onnx(model, out / ONNX_FILE, self.config.opset)
        artifact = source.derive("onnx", out, f"jax_onnx opset {self.config.opset} (keras twin)", file=ONNX_FILE,
                                 opset=self.config.opset, exporter="jax params -> keras twin (tf2onnx)",
                                 input_name=INPUT, output_name=OUTPUT, batch_size=None)
        artifact.save_meta()
        return artifact

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        from mlk_plugins.compilers.onnx import ort_runner

        return ort_runner(artifact.file, threads)


def keras_twin(source: Artifact, probe: Any) -> Any:
    """The jax artifact's model built for keras with the artifact's parameters, checked to compute the
    same logits as JAX on ``probe`` inputs (or seeded noise); :class:`Unavailable` when there is no twin."""
    import numpy as np

    from mlk.registry import registry
    from mlk.trial import build_model
    from mlk_plugins.frameworks.jax._impl import flatten
    from mlk_plugins.frameworks.jax.artifacts import MODULE, inference_function, load_flax

    recipe = json.loads((source.path / MODULE).read_text())
    what = recipe["model"].get("name") or recipe["model"].get("_target_")
    import_tensorflow()
    import keras

    why = "it is not a keras.Model"
    try:
        model = build_model(registry(), recipe["model"], "keras", recipe["meta"])
    except UserError as e:
        model, why = None, e.message
    if not isinstance(model, keras.Model):
        raise Unavailable(f"jax_onnx needs a keras build of model '{what}' to export through, and it has none "
                          f"({why}); jax2onnx would not need one, but it conflicts with this environment's "
                          "orbax-checkpoint")
    _, params = load_flax(source)
    arrays = dict(flatten(params))
    used = set()
    for layer in model.layers:
        for weight in layer.weights:
            key = f"{layer.name}/{weight.name}"
            if key not in arrays or tuple(arrays[key].shape) != tuple(weight.shape):
                raise Unavailable(f"the keras build of model '{what}' has weight {key} {tuple(weight.shape)}, which "
                                  "the JAX parameters do not match; the two builds must share layer names")
            weight.assign(arrays[key])
            used.add(key)
    if used != set(arrays):
        raise Unavailable(f"the keras build of model '{what}' lacks JAX parameters {sorted(set(arrays) - used)}")
    shape = [int(d) for d in source.meta["input_shape"]]
    if probe is not None and len(probe):
        x = np.asarray(probe, np.float32)[:16].reshape(-1, *shape)
    else:
        x = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
    diff = float(np.abs(np.asarray(inference_function(source)(x)) - model(x, training=False).numpy()).max())
    if diff > TWIN_TOLERANCE:
        raise MlkError(f"the keras twin of model '{what}' differs from the JAX model by {diff:.2e} "
                       f"(> {TWIN_TOLERANCE}); their architectures are not the same")
    return model
