"""``keras_onnx`` and ``keras_tflite``: a ``keras`` artifact to ONNX, and to TFLite natively.

``keras_onnx`` uses Keras 3's own exporter (``model.export(format="onnx")``, tf2onnx underneath),
then names the input ``x``, the output ``logits`` and the batch axis ``batch``, as the torch route
does, so ``onnxruntime``, ``tvm``, ``tflite`` (onnx2tf) and ``tensorrt`` take it unchanged. The
kernel inserts it in front of any of them when the run trained with ``framework.name: keras``.

``keras_tflite`` converts the model's inference function with TensorFlow's own
``TFLiteConverter`` (no ONNX in between): float, dynamic-range or full int8 calibrated on training
inputs, with a dynamic batch. Its artifacts are ``tflite`` artifacts like the ``tflite``
compiler's (same runner and facts); the input keeps the dataset's layout (the Keras model moves
channels last inside), so ``input_nhwc`` is false. :func:`convert` and :func:`tflite_artifact` are shared
with the JAX route.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from mlk.compiler import Artifact, CompileConfig, CompileInputs, Compiler, Runner
from mlk.errors import MlkError
from mlk_plugins._tensorflow import import_tensorflow
from mlk_plugins.compilers.tflite import FILE as TFLITE_FILE
from mlk_plugins.compilers.tflite import TfliteCompiler, TfliteConfig, _calibration, _inspect

ONNX_FILE = "model.onnx"
INPUT, OUTPUT, BATCH = "x", "logits", "batch"


class KerasOnnxConfig(CompileConfig):
    """``compile:`` entry of ``name: keras_onnx``."""

    opset: int = Field(17, ge=13, le=18, description="ONNX opset of the default domain (tf2onnx writes 13-18)")


class KerasOnnx(Compiler):
    """Export a keras artifact to ONNX with Keras's exporter (tf2onnx): input ``x``, output ``logits``,
    dynamic batch."""

    name = "keras_onnx"
    Config: ClassVar[type[KerasOnnxConfig]] = KerasOnnxConfig
    accepts = ("keras",)
    produces = "onnx"
    requires = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime")
    extra = "keras"
    config: KerasOnnxConfig

    def describe(self, source_format: str) -> str:
        return f"{self.name}: {source_format} -> onnx (opset {self.config.opset}, keras exporter, dynamic batch)"

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        from mlk_plugins.frameworks.keras.artifacts import load_keras

        import_tensorflow()
        keras_to_onnx(load_keras(source), out / ONNX_FILE, self.config.opset)
        artifact = source.derive("onnx", out, f"keras_onnx opset {self.config.opset}", file=ONNX_FILE,
                                 opset=self.config.opset, exporter="keras (tf2onnx)", input_name=INPUT,
                                 output_name=OUTPUT, batch_size=None)
        artifact.save_meta()
        return artifact

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        from mlk_plugins.compilers.onnx import ort_runner

        return ort_runner(artifact.file, threads)


def keras_to_onnx(model: Any, path: Path, opset: int) -> None:
    """Write the ``keras.Model`` ``model`` to ``path`` as checked ONNX (input ``x``, output ``logits``)."""
    import onnx

    tf = import_tensorflow()
    shape = [int(d) for d in model.inputs[0].shape[1:]]
    signature = [tf.TensorSpec([None, *shape], tf.float32, name=INPUT)]
    # tf2onnx's numpy deprecation notices and the exporter's listing of the traced endpoint
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        model.export(str(path), format="onnx", verbose=False, opset_version=opset, input_signature=signature)
    proto = name_io(onnx.load(str(path)))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise MlkError(f"the ONNX export of keras model '{model.name}' is invalid: {e}") from e
    onnx.save(proto, str(path))


def name_io(model: Any) -> Any:
    """``model`` with its single input named ``x``, its single output ``logits`` and their first axis
    ``batch`` (tf2onnx writes the Keras names, ``Identity:0`` and ``unk__N``)."""
    renames = {model.graph.input[0].name: INPUT, model.graph.output[0].name: OUTPUT}
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in (model.graph.input[0], model.graph.output[0]):
        value.name = renames[value.name]
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH
    return model


class NativeTflite(Compiler):
    """Base of compilers that make ``tflite`` artifacts with TensorFlow's own converter from a framework
    artifact; their artifacts run with the ``tflite`` compiler's runner."""

    Config: ClassVar[type[TfliteConfig]] = TfliteConfig
    produces = "tflite"
    requires: ClassVar[tuple[str, ...]] = ("tensorflow", "ai_edge_litert")
    extra = "tflite"
    config: TfliteConfig

    def describe(self, source_format: str) -> str:
        return f"{self.name}: {source_format} -> {self.produces} (quantize: {self.config.quantize}, native)"

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        return TfliteCompiler(self.config).runner(artifact, threads)


class KerasTflite(NativeTflite):
    """A keras artifact to TensorFlow Lite with TensorFlow's own converter (float, dynamic-range or
    full int8), no ONNX in between."""

    name = "keras_tflite"
    accepts = ("keras",)
    requires = ("tensorflow", "keras", "ai_edge_litert")

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        from mlk_plugins.frameworks.keras.artifacts import load_keras

        tf = import_tensorflow()
        model = load_keras(source)
        with contextlib.redirect_stdout(io.StringIO()):  # Keras lists the endpoint it traces for the converter
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            return tflite_artifact(self, source, out, inputs, converter, "keras")


def function_converter(function: Any, folder: Path) -> Any:
    """A ``TFLiteConverter`` of the ``tf.function`` ``function`` (input signature set, no variables:
    jax2tf's functions hold their parameters as constants), through a SavedModel written to the
    empty ``folder`` (kept until the conversion is done), as the ``tflite`` compiler does."""
    tf = import_tensorflow()
    holder = tf.Module()
    holder.serve = function
    tf.saved_model.save(holder, str(folder), signatures=function.get_concrete_function())
    return tf.lite.TFLiteConverter.from_saved_model(str(folder))


def convert(converter: Any, quantize: str, calibration: Any) -> bytes:
    """The flatbuffer ``converter`` makes with ``quantize`` as the ``tflite`` compiler's (``calibration``:
    the inputs in the dataset's layout that calibrate ``int8``)."""
    import numpy as np

    tf = import_tensorflow()
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if calibration is not None:
        def samples() -> Any:
            for row in calibration:
                yield [np.ascontiguousarray(row[None], dtype=np.float32)]

        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bytes(converter.convert())


def tflite_artifact(compiler: NativeTflite, source: Artifact, out: Path, inputs: CompileInputs, converter: Any,
                    route: str) -> Artifact:
    """Convert with ``converter`` and ``compiler``'s quantisation settings and describe it as the ``tflite``
    compiler describes its artifacts."""
    tf = import_tensorflow()
    cfg = compiler.config
    calibration = None
    if cfg.quantize == "int8":
        calibration = _calibration(inputs.calibration, [int(d) for d in source.meta["input_shape"]],
                                   cfg.calibration_size)
    (out / TFLITE_FILE).write_bytes(convert(converter, cfg.quantize, calibration))
    facts = _inspect(out / TFLITE_FILE)
    facts.update(quantize=cfg.quantize, input_nhwc=False,
                 converter=f"{route} -> TFLiteConverter, tensorflow {tf.__version__}")
    if calibration is not None:
        facts["calibration_size"] = len(calibration)
    artifact = source.derive("tflite", out, f"{cfg.id or compiler.name} (quantize: {cfg.quantize})",
                             file=TFLITE_FILE, tflite=facts)
    artifact.save_meta()
    return artifact
