"""``onnxruntime``: an ONNX model optimised offline by ONNX Runtime, optionally quantised to int8.

Steps, all with onnxruntime's own tools:

1. quantisation (``quantize``): ``dynamic`` (weights int8, activations quantised at run time:
   ``quantize_dynamic(weight_type=QInt8)``) or ``static`` (weights and activations int8, ranges from
   calibration inputs: ``quantize_static`` in QDQ format, activations uint8 and weights int8 as
   onnxruntime advises for x86 CPUs). Both start with ``quant_pre_process`` (shape inference and
   basic optimisation).
2. graph optimisation (``optimization``) into ``model.ort.onnx`` through
   ``SessionOptions.optimized_model_filepath``. ``extended`` and ``all`` write onnxruntime's fused
   operators (``com.microsoft`` domain), and ``all`` layout transforms for this CPU's instruction set:
   the file then runs only on onnxruntime, on a CPU like this one.

The runner loads the file with graph optimisation off (it is already optimised), so what runs is
what was compiled.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from mlk.compiler import Artifact, CompileConfig, CompileInputs, Compiler, Runner
from mlk.errors import UserError

FILE = "model.ort.onnx"
#: Calibration examples per onnxruntime calibration batch.
CALIBRATION_BATCH = 32


class OnnxRuntimeConfig(CompileConfig):
    """``compile:`` entry of ``name: onnxruntime``."""

    optimization: Literal["basic", "extended", "all"] = Field(
        "all", description="onnxruntime graph optimisation level applied offline (extended and all write "
                           "onnxruntime-only fused operators; all also CPU-specific layouts)")
    quantize: Literal["none", "dynamic", "static"] = Field(
        "none", description="int8 quantisation: none; dynamic (int8 weights, activations quantised at run "
                            "time); static (int8 weights and activations, ranges from calibration inputs, QDQ)")
    calibration_size: int = Field(256, ge=1, description="training examples used to calibrate static quantisation")
    per_channel: bool = Field(True, description="quantise weights per output channel (else per tensor)")


class OnnxRuntimeCompiler(Compiler):
    """Optimise an ONNX model offline with ONNX Runtime and optionally quantise it to int8."""

    name = "onnxruntime"
    Config: ClassVar[type[OnnxRuntimeConfig]] = OnnxRuntimeConfig
    accepts = ("onnx",)
    produces = "onnxruntime"
    requires = ("onnxruntime", "onnx")
    extra = "onnx"
    config: OnnxRuntimeConfig

    def describe(self, source_format: str) -> str:
        c = self.config
        quant = "" if c.quantize == "none" else f", {c.quantize} int8"
        return f"{self.name}: {source_format} -> onnxruntime (optimization {c.optimization}{quant})"

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        from mlk_plugins.compilers.onnx import load_onnx

        c = self.config
        model = load_onnx(source.file)
        input_name = model.graph.input[0].name
        facts: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="mlk-ort-") as tmp:
            work = Path(tmp)
            if c.quantize == "none":
                to_optimize = source.file
            else:
                to_optimize = work / "quantized.onnx"
                facts = self._quantize(source.file, work, to_optimize, input_name, inputs)
            _optimize_offline(to_optimize, out / FILE, c.optimization, inputs.threads)
        step = f"onnxruntime {c.optimization}" + ("" if c.quantize == "none" else f", {c.quantize} int8")
        artifact = source.derive("onnxruntime", out, step, file=FILE, optimization=c.optimization,
                                 quantize=c.quantize, **facts)
        artifact.save_meta()
        return artifact

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        from mlk_plugins.compilers.onnx import ort_runner

        return ort_runner(artifact.file, threads, optimize=False)

    def _quantize(self, src: Path, work: Path, dst: Path, input_name: str, inputs: CompileInputs) -> dict[str, Any]:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        c = self.config
        prepared = work / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        if c.quantize == "dynamic":
            quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8, per_channel=c.per_channel)
            return {"per_channel": c.per_channel}
        calibration = _calibration(inputs, c.calibration_size, _input_dims(prepared)[1:])
        reader = _reader(calibration, input_name, _input_dims(prepared)[0])
        quantize_static(str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=c.per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return {"per_channel": c.per_channel, "calibration_examples": len(calibration)}


def _calibration(inputs: CompileInputs, size: int, example_dims: list[int | None]) -> Any:
    """The first ``size`` calibration inputs, reshaped to the model's example shape when only the layout
    differs (flat dataset rows for an image model)."""
    import math

    import numpy as np

    if inputs.calibration is None or len(inputs.calibration) == 0:
        raise UserError("static quantisation needs calibration inputs, and this run has none",
                        where="compile.quantize", hint="use quantize: dynamic, or a run with a dataset")
    data = np.ascontiguousarray(inputs.calibration[:size], dtype=np.float32)
    dims = [d for d in example_dims if d is not None]
    if len(dims) == len(example_dims) and list(data.shape[1:]) != dims:
        if math.prod(data.shape[1:]) != math.prod(dims):
            raise UserError(f"calibration inputs of shape {list(data.shape[1:])} do not fit the model's input "
                            f"{dims}", where="compile.quantize")
        data = data.reshape(len(data), *dims)
    return data


def _input_dims(path: Path) -> list[int | None]:
    """The model input's dimensions; None for symbolic ones."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def _reader(data: Any, input_name: str, fixed: int | None) -> Any:
    """A ``CalibrationDataReader`` over ``data`` in batches (of the model's batch size when it is fixed)."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader

    size = fixed or CALIBRATION_BATCH
    batches = []
    for start in range(0, len(data), size):
        chunk = data[start:start + size]
        if fixed and len(chunk) < fixed:  # pad by repeating real examples, so ranges stay those of real data
            chunk = np.resize(chunk, (fixed, *data.shape[1:]))
        batches.append({input_name: np.ascontiguousarray(chunk)})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

        def rewind(self) -> None:
            self.items = iter(batches)

    return Reader()


def _optimize_offline(src: Path, dst: Path, level: str, threads: int) -> None:
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.optimized_model_filepath = str(dst)
    options.intra_op_num_threads = max(1, threads)
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
