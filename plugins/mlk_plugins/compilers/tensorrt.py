"""``tensorrt``: an ONNX artifact to a serialized TensorRT engine (``model.engine``) for NVIDIA GPUs.

The TensorRT builder parses the ONNX file, builds for an optimisation profile over the batch axis
(1 to ``max_batch``) in fp32, fp16 or int8 (entropy calibration, ``IInt8EntropyCalibrator2``, over
``inputs.calibration``) and serialises the engine. Engines are specific to the GPU model and the
TensorRT version that built them. This is written against the TensorRT 8.6-10.x Python API
(name-based tensors, ``execute_async_v3``); TensorRT 11 removed the fp16/int8 builder flags and the
calibrators, so there only ``precision: fp32`` builds. Device buffers come from ``cuda-python``.
Without the ``tensorrt`` package or an NVIDIA GPU, compile and runner raise
:class:`~mlk.compiler.Unavailable`.
"""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from mlk.compiler import Artifact, CompileConfig, CompileInputs, Compiler, Runner, Unavailable
from mlk.errors import MlkError, UserError

FILE = "model.engine"
CACHE = "calibration.cache"
NEEDS = "TensorRT needs an NVIDIA GPU and the tensorrt package"
#: Rows per calibration batch (fewer when there is less calibration data).
CALIBRATION_BATCH = 32


class TensorrtConfig(CompileConfig):
    """``compile:`` entry of ``name: tensorrt``."""

    precision: Literal["fp32", "fp16", "int8"] = Field(
        "fp16", description="kernels TensorRT may pick: fp32 only; fp16 too; int8 too (calibrated on training "
                            "inputs, fp16 where int8 does not pay)")
    calibration_size: int = Field(256, ge=1, description="training inputs that calibrate precision: int8")
    workspace_mb: int = Field(1024, ge=1, description="GPU scratch memory the builder's tactics may use, in MiB")
    max_batch: int = Field(256, ge=1, description="largest batch of the engine's optimisation profile (the runner "
                                                  "splits larger batches)")


class TensorrtCompiler(Compiler):
    """ONNX to a TensorRT engine (fp32, fp16 or entropy-calibrated int8); needs an NVIDIA GPU."""

    name = "tensorrt"
    Config: ClassVar[type[TensorrtConfig]] = TensorrtConfig
    accepts = ("onnx",)
    produces = "tensorrt"
    requires = ("tensorrt",)
    extra = "tensorrt"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            load_tensorrt()
        except Unavailable as e:
            return f"{e}; {cls.install_hint()} on a machine with one"
        return None
    config: TensorrtConfig

    def describe(self, source_format: str) -> str:
        return f"{self.name}: {source_format} -> {self.produces} ({self.config.precision})"

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        import numpy as np

        trt, cuda = load_tensorrt()
        cfg = self.config
        major = int(trt.__version__.split(".")[0])
        if cfg.precision != "fp32" and major >= 11:
            raise UserError(f"TensorRT {trt.__version__} has no {cfg.precision} builder flag (TensorRT 11 builds "
                            "strongly typed networks only)", where="compile.precision",
                            hint="use precision: fp32, or convert the ONNX model to mixed precision or Q/DQ first")
        shape = [int(d) for d in source.meta["input_shape"]]
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(source.file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise MlkError(f"TensorRT's ONNX parser rejected {source.file.name}: {errors}")
        tensor = network.get_input(0)
        fixed = int(tensor.shape[0]) if int(tensor.shape[0]) > 0 else None
        low, high = (fixed, fixed) if fixed else (1, cfg.max_batch)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb << 20)
        if fixed is None:
            profile = builder.create_optimization_profile()
            profile.set_shape(tensor.name, (1, *shape), (min(32, high), *shape), (high, *shape))
            config.add_optimization_profile(profile)
        if cfg.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        calibrator = None
        if cfg.precision == "int8":
            if inputs.calibration is None:
                raise UserError("tensorrt precision: int8 needs calibration inputs, and this run has no dataset",
                                where="compile.precision")
            data = np.asarray(inputs.calibration, dtype=np.float32)[:cfg.calibration_size]
            data = data.reshape(len(data), *shape)
            rows = fixed or min(CALIBRATION_BATCH, len(data))
            calibrator = _calibrator(trt, cuda, data, rows, out / CACHE)
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = calibrator
            if fixed is None:
                calibration_profile = builder.create_optimization_profile()
                calibration_profile.set_shape(tensor.name, *[(rows, *shape)] * 3)
                config.set_calibration_profile(calibration_profile)
        serialized = builder.build_serialized_network(network, config)
        if calibrator is not None:
            calibrator.release()
        if serialized is None:
            raise MlkError("TensorRT could not build the engine (its log above says why)")
        (out / FILE).write_bytes(bytes(serialized))
        facts = {"precision": cfg.precision, "version": trt.__version__, "device": cuda.device_name(),
                 "input": {"name": tensor.name, "shape": [int(d) for d in tensor.shape]},
                 "output": {"name": network.get_output(0).name}, "batch_range": [low, high],
                 "workspace_mb": cfg.workspace_mb}
        if calibrator is not None:
            facts["calibration_size"] = calibrator.rows
        artifact = source.derive(self.produces, out, f"{cfg.id or self.name} ({cfg.precision})", file=FILE,
                                 tensorrt=facts)
        artifact.save_meta()
        return artifact

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        import numpy as np

        trt, cuda = load_tensorrt()
        facts = artifact.meta["tensorrt"]
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(artifact.file.read_bytes())
        if engine is None:
            raise Unavailable(f"this TensorRT engine was built by TensorRT {facts['version']} on "
                              f"{facts['device']} and does not load with TensorRT {trt.__version__} here")
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        source = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        target = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        in_type = trt.nptype(engine.get_tensor_dtype(source))
        out_type = trt.nptype(engine.get_tensor_dtype(target))
        shape = [int(d) for d in artifact.meta["input_shape"]]
        low, high = facts["batch_range"]
        context.set_input_shape(source, (high, *shape))
        out_items = math.prod(int(d) for d in context.get_tensor_shape(target))
        in_ptr = cuda.malloc(high * math.prod(shape) * np.dtype(in_type).itemsize)
        out_ptr = cuda.malloc(out_items * np.dtype(out_type).itemsize)
        stream = cuda.stream()
        context.set_tensor_address(source, in_ptr)
        context.set_tensor_address(target, out_ptr)

        def invoke(x: Any) -> Any:
            context.set_input_shape(source, tuple(x.shape))
            cuda.to_device(in_ptr, np.ascontiguousarray(x, dtype=in_type), stream)
            if not context.execute_async_v3(stream):
                raise MlkError("TensorRT failed to run the engine")
            y = np.empty(tuple(int(d) for d in context.get_tensor_shape(target)), dtype=out_type)
            cuda.to_host(y, out_ptr, stream)
            cuda.synchronize(stream)
            return y.astype(np.float32)

        def run(x: Any) -> Any:
            x = np.asarray(x, dtype=np.float32)
            parts = []
            for start in range(0, len(x), high):
                chunk = x[start:start + high]
                pad = max(0, low - len(chunk))
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
                parts.append(invoke(chunk)[:len(chunk) - pad])
            return np.concatenate(parts)

        # Free the device buffers (and keep the engine alive) for as long as the runner lives.
        weakref.finalize(run, cuda.release, [in_ptr, out_ptr], stream, (engine, context, runtime))
        return run


def load_tensorrt() -> tuple[Any, Any]:
    """``tensorrt`` and a small CUDA helper, or :class:`Unavailable` saying what is missing here."""
    problems = []
    trt = None
    try:
        import tensorrt as trt
    except ImportError as e:
        problems.append(f"the tensorrt package cannot be imported ({e})")
    try:
        cuda = _Cuda()
    except ImportError as e:
        problems.append(f"cuda-python cannot be imported ({e})")
        cuda = None
    if cuda is not None:
        count = cuda.device_count()
        if count == 0:
            problems.append("CUDA sees no GPU")
    elif not _nvidia_gpu_listed():
        problems.append("no NVIDIA GPU is listed in /proc/driver/nvidia/gpus")
    if problems:
        raise Unavailable(f"{NEEDS}; here {', and '.join(problems)}")
    return trt, cuda


def _nvidia_gpu_listed() -> bool:
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


class _Cuda:
    """The few CUDA runtime calls the builder's calibrator and the runner need, through cuda-python."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python 12.6 and later
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.rt = cudart

    def _call(self, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise MlkError(f"CUDA call failed: {self.rt.cudaGetErrorName(err)[1]!r}")
        return values[0] if len(values) == 1 else values

    def device_count(self) -> int:
        err, count = self.rt.cudaGetDeviceCount()
        return int(count) if err == self.rt.cudaError_t.cudaSuccess else 0

    def device_name(self) -> str:
        props = self._call(self.rt.cudaGetDeviceProperties(0))
        name = props.name
        return (name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)).strip()

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(max(1, nbytes))))

    def stream(self) -> Any:
        return int(self._call(self.rt.cudaStreamCreate()))

    def to_device(self, ptr: int, array: Any, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, stream))

    def to_host(self, array: Any, ptr: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, stream))

    def synchronize(self, stream: int) -> None:
        self._call(self.rt.cudaStreamSynchronize(stream))

    def release(self, pointers: list[int], stream: int | None = None, keep: Any = None) -> None:
        for ptr in pointers:
            self.rt.cudaFree(ptr)
        if stream is not None:
            self.rt.cudaStreamDestroy(stream)


def _calibrator(trt: Any, cuda: _Cuda, data: Any, rows: int, cache: Path) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding ``data`` in batches of ``rows`` (a partial last batch is dropped)."""
    import numpy as np

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            usable = (len(data) // rows) * rows
            self.batches = [np.ascontiguousarray(data[i:i + rows]) for i in range(0, usable, rows)]
            self.rows = usable
            self.device = cuda.malloc(self.batches[0].nbytes)
            self.next = 0

        def get_batch_size(self) -> int:
            return rows

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.next >= len(self.batches):
                return None
            batch = self.batches[self.next]
            self.next += 1
            kind = cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            cuda._call(cuda.rt.cudaMemcpy(self.device, batch.ctypes.data, batch.nbytes, kind))
            return [self.device] * len(names)

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, blob: Any) -> None:
            cache.write_bytes(bytes(blob))

        def release(self) -> None:
            cuda.release([self.device])

    return EntropyCalibrator()
