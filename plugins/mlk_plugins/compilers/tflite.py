"""``tflite``: an ONNX artifact to a TensorFlow Lite flatbuffer, float or quantised.

The route is ONNX -> TensorFlow (``onnx2tf``, in a temporary folder, offline) -> SavedModel ->
``tf.lite.TFLiteConverter``. onnx2tf turns channels-first inputs channels-last (NCHW -> NHWC), as
mobile runtimes expect; the artifact records that, and its runner transposes, so it takes the same
float32 NCHW batches as every other runner. Quantisation: ``dynamic`` stores int8 weights and
computes in float; ``int8`` is full integer (weights, activations, int8 input and output)
calibrated on ``inputs.calibration``, and the runner quantises inputs and dequantises logits.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from mlk.compiler import Artifact, CompileConfig, CompileInputs, Compiler, Runner
from mlk.errors import MlkError, UserError
from mlk_plugins._tensorflow import import_tensorflow

FILE = "model.tflite"
#: onnx2tf asks for this many sample images when it wants some (see ``_offline_samples``).
_SAMPLES = 20


class TfliteConfig(CompileConfig):
    """``compile:`` entry of ``name: tflite``."""

    quantize: Literal["none", "dynamic", "int8"] = Field(
        "none", description="none: float32; dynamic: int8 weights, float compute; int8: full integer with int8 "
                            "input and output, calibrated on training inputs")
    calibration_size: int = Field(200, ge=1, description="training inputs that calibrate quantize: int8")


class TfliteCompiler(Compiler):
    """ONNX to TensorFlow Lite through onnx2tf and the TFLite converter (float, dynamic-range or full int8)."""

    name = "tflite"
    Config: ClassVar[type[TfliteConfig]] = TfliteConfig
    accepts = ("onnx",)
    produces = "tflite"
    requires = ("tensorflow", "onnx2tf", "ai_edge_litert")
    extra = "tflite"
    config: TfliteConfig

    def describe(self, source_format: str) -> str:
        return f"{self.name}: {source_format} -> {self.produces} (quantize: {self.config.quantize})"

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        cfg = self.config
        shape = [int(d) for d in source.meta["input_shape"]]
        calibration = None
        if cfg.quantize == "int8":
            calibration = _calibration(inputs.calibration, shape, cfg.calibration_size)
        tf = import_tensorflow()
        with tempfile.TemporaryDirectory(prefix="mlk-onnx2tf-") as tmp:
            keras_model = _onnx_to_keras(source.file, Path(tmp), shape, calibration)
            saved = Path(tmp) / "saved_model"
            tf.saved_model.save(keras_model, str(saved))
            converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
            nhwc = _channels_last(shape, list(keras_model.inputs[0].shape[1:]))
            if cfg.quantize != "none":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if calibration is not None:
                converter.representative_dataset = _representative(calibration, nhwc)
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
            flatbuffer = converter.convert()
        (out / FILE).write_bytes(flatbuffer)
        facts = _inspect(out / FILE)
        facts.update(quantize=cfg.quantize, input_nhwc=nhwc, converter=_versions())
        if calibration is not None:
            facts["calibration_size"] = len(calibration)
        artifact = source.derive(self.produces, out, f"{self.config.id or self.name} (quantize: {cfg.quantize})",
                                 file=FILE, tflite=facts)
        artifact.save_meta()
        return artifact

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(artifact.file), num_threads=max(1, threads))
        inp = interpreter.get_input_details()[0]
        outp = interpreter.get_output_details()[0]
        nhwc = bool(artifact.meta.get("tflite", {}).get("input_nhwc", False))
        fixed = int(inp["shape_signature"][0]) if int(inp["shape_signature"][0]) > 0 else None
        in_scale, in_zero = inp["quantization"]
        out_scale, out_zero = outp["quantization"]
        in_dtype, out_int = inp["dtype"], np.issubdtype(outp["dtype"], np.integer)
        current: list[int] = []

        def invoke(x: Any) -> Any:
            if list(x.shape) != current:
                interpreter.resize_tensor_input(inp["index"], list(x.shape))
                interpreter.allocate_tensors()
                current[:] = list(x.shape)
            if np.issubdtype(in_dtype, np.integer):
                info = np.iinfo(in_dtype)
                x = np.clip(np.round(x / in_scale) + in_zero, info.min, info.max).astype(in_dtype)
            interpreter.set_tensor(inp["index"], np.ascontiguousarray(x))
            interpreter.invoke()
            y = interpreter.get_tensor(outp["index"])
            if out_int:
                return (y.astype(np.float32) - out_zero) * np.float32(out_scale)
            return np.array(y, dtype=np.float32)

        def run(x: Any) -> Any:
            x = np.asarray(x, dtype=np.float32)
            if nhwc:
                x = np.moveaxis(x, 1, -1)
            if fixed is None:
                return invoke(x)
            # A model converted with a fixed batch: run it in chunks of that batch, padding the last one.
            parts = []
            for start in range(0, len(x), fixed):
                chunk = x[start:start + fixed]
                pad = fixed - len(chunk)
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
                parts.append(invoke(chunk)[:fixed - pad])
            return np.concatenate(parts)

        return run


def _calibration(data: Any, shape: list[int], size: int) -> Any:
    import numpy as np

    if data is None:
        raise UserError("tflite quantize: int8 needs calibration inputs, and this run has no dataset",
                        where="compile.quantize", hint="use quantize: dynamic, or give the spec a data section")
    data = np.asarray(data, dtype=np.float32)[:size]
    if data.size != len(data) * int(np.prod(shape)):
        raise MlkError(f"calibration inputs of shape {list(data.shape[1:])} do not fit the model's input {shape}")
    return data.reshape(len(data), *shape)


def _channels_last(source: list[int], converted: list[Any]) -> bool:
    """Whether onnx2tf moved the channel axis last (it does so for every input of rank 3 to 5)."""
    got = [int(d) if d is not None else None for d in converted]
    if len(source) >= 2 and got == [*source[1:], source[0]]:
        return True
    if got == source:
        return False
    raise MlkError(f"onnx2tf made an input of shape {got} from the ONNX input {source}; expected either "
                   "that shape or its channels-last form")


def _representative(calibration: Any, nhwc: bool) -> Any:
    import numpy as np

    def samples() -> Iterator[list[Any]]:
        for row in calibration:
            x = row[None]
            yield [np.ascontiguousarray(np.moveaxis(x, 1, -1) if nhwc else x)]

    return samples


def _onnx_to_keras(onnx_file: Path, tmp: Path, shape: list[int], calibration: Any) -> Any:
    """The ONNX model as a tf_keras model, converted by onnx2tf quietly and without the network."""
    import importlib
    import random
    from unittest import mock

    import numpy as np

    # Importing onnx2tf seeds Python's, numpy's and TensorFlow's global generators: keep ours.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        module = importlib.import_module("onnx2tf.onnx2tf")
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    # onnx2tf may rewrite the ONNX file it is given (shape inference): give it a copy.
    copy = tmp / "onnx"
    shutil.copytree(onnx_file.parent, copy)
    try:
        with mock.patch.object(module, "download_test_image_data", _offline_samples(shape, calibration)):
            return module.convert(
                input_onnx_file_path=str(copy / onnx_file.name),
                output_folder_path=str(tmp / "onnx2tf"),
                not_use_onnxsim=True,
                disable_model_save=True,
                verbosity="error",
            )
    except SystemExit as e:  # onnx2tf exits on what it cannot convert, after logging why
        raise MlkError(f"onnx2tf could not convert {onnx_file.name} (exit status {e.code}; its log above "
                       "says why)") from None


def _offline_samples(shape: list[int], calibration: Any) -> Any:
    """Stands in for onnx2tf's ``download_test_image_data``, which fetches sample images from GitHub when
    an input has a small fixed batch and 3 channels: our calibration inputs, or seeded noise, instead."""
    import numpy as np

    def samples() -> Any:
        if calibration is not None and len(calibration) and len(shape) == 3:
            data = np.moveaxis(calibration[:_SAMPLES], 1, -1)
            reps = -(-_SAMPLES // len(data))
            return np.ascontiguousarray(np.concatenate([data] * reps)[:_SAMPLES], dtype=np.float32)
        nhwc = [*shape[1:], shape[0]] if len(shape) >= 2 else shape
        return np.random.default_rng(0).random((_SAMPLES, *nhwc), dtype=np.float32)

    return samples


def _inspect(path: Path) -> dict[str, Any]:
    """Input and output facts of a TFLite file, read back with the LiteRT interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))

    def describe(d: dict[str, Any]) -> dict[str, Any]:
        scale, zero = d["quantization"]
        facts: dict[str, Any] = {"name": d["name"], "shape": [int(v) for v in d["shape_signature"]],
                                 "dtype": d["dtype"].__name__}
        if scale:
            facts.update(scale=float(scale), zero_point=int(zero))
        return facts

    return {"input": describe(interpreter.get_input_details()[0]),
            "output": describe(interpreter.get_output_details()[0]),
            "size_bytes": path.stat().st_size}


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("onnx2tf", "tensorflow-cpu", "tensorflow"):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{dist} {version(dist)}")
    return ", ".join(found)
