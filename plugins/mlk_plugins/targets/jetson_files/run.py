"""Run this bundle's model on a batch: ``python run.py --input x.npy --output logits.npy``.

On a Jetson (or any machine with an NVIDIA GPU, TensorRT and cuda-python) it runs the engine that
``build_engine.py`` built. Where TensorRT, the GPU or the engine is missing it says so on stderr and
runs ``model.onnx`` with ONNX Runtime on the CPU instead (``--runtime tensorrt`` refuses to fall back).
Inputs are float32, batch first, already preprocessed as ``manifest.json`` describes. Every file is
checked against the manifest's sha256 first. Needs only numpy and tensorrt or onnxruntime.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def say(message: str) -> None:
    print(f"run.py: {message}", file=sys.stderr, flush=True)


def verify(manifest: dict[str, Any]) -> None:
    """Exit 3 when a file differs from the manifest (a truncated copy, a swapped model)."""
    for rel, want in sorted(manifest["files"].items()):
        path = HERE / rel
        if not path.is_file():
            say(f"{rel} is missing from the bundle")
            raise SystemExit(3)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != want["sha256"]:
            say(f"{rel} does not match the manifest's sha256 (the bundle is damaged or was changed)")
            raise SystemExit(3)


def tensorrt_runner(engine_path: Path, manifest: dict[str, Any]) -> Any:
    """A function running the TensorRT engine, or an ImportError/RuntimeError saying why it cannot."""
    import numpy as np
    import tensorrt as trt

    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart

    def call(result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA call failed: {cudart.cudaGetErrorName(err)[1]!r}")
        return values[0] if len(values) == 1 else values

    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        raise RuntimeError("CUDA sees no GPU")
    if not engine_path.is_file():
        raise RuntimeError(f"no engine at {engine_path.name}; build it on this device with `python build_engine.py`")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"{engine_path.name} does not load with TensorRT {trt.__version__} on this GPU (engines "
                           "are specific to the GPU and TensorRT version that built them; rebuild it here)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    source = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    target = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    in_type = trt.nptype(engine.get_tensor_dtype(source))
    out_type = trt.nptype(engine.get_tensor_dtype(target))
    shape = manifest["input"]["shape"]
    high = int(engine.get_tensor_profile_shape(source, 0)[2][0]) if manifest["input"]["dynamic_batch"] else 1
    context.set_input_shape(source, (high, *shape))
    out_items = math.prod(int(d) for d in context.get_tensor_shape(target))
    in_ptr = call(cudart.cudaMalloc(high * math.prod(shape) * np.dtype(in_type).itemsize))
    out_ptr = call(cudart.cudaMalloc(out_items * np.dtype(out_type).itemsize))
    stream = call(cudart.cudaStreamCreate())
    context.set_tensor_address(source, in_ptr)
    context.set_tensor_address(target, out_ptr)
    to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost

    def invoke(x: Any) -> Any:
        x = np.ascontiguousarray(x, dtype=in_type)
        context.set_input_shape(source, tuple(x.shape))
        call(cudart.cudaMemcpyAsync(in_ptr, x.ctypes.data, x.nbytes, to_device, stream))
        if not context.execute_async_v3(stream):
            raise RuntimeError("TensorRT failed to run the engine")
        y = np.empty(tuple(int(d) for d in context.get_tensor_shape(target)), dtype=out_type)
        call(cudart.cudaMemcpyAsync(y.ctypes.data, out_ptr, y.nbytes, to_host, stream))
        call(cudart.cudaStreamSynchronize(stream))
        return y.astype(np.float32)

    def run(x: Any) -> Any:
        return np.concatenate([invoke(x[i:i + high]) for i in range(0, len(x), high)])

    run.keep = (engine, context, runtime)  # type: ignore[attr-defined]
    return run


def onnxruntime_runner(manifest: dict[str, Any], threads: int) -> Any:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(HERE / manifest["model"]), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    step = None if manifest["input"]["dynamic_batch"] else 1

    def run(x: Any) -> Any:
        if step is None:
            return session.run(None, {name: x})[0]
        return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])

    return run


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help=".npy of float32 inputs, batch first")
    p.add_argument("--output", required=True, help="where to write the logits (.npy)")
    p.add_argument("--runtime", choices=["auto", "tensorrt", "onnxruntime"], default="auto")
    p.add_argument("--engine", help="TensorRT engine file (default: the manifest's, for its precision)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the ONNX Runtime fallback")
    p.add_argument("--report", help="write what ran (runtime, why, timing) to this JSON file")
    args = p.parse_args(argv)
    manifest = json.loads((HERE / "manifest.json").read_text())
    verify(manifest)
    x = np.load(args.input, allow_pickle=False).astype(np.float32)
    want = manifest["input"]["shape"]
    if list(x.shape[1:]) != want:
        say(f"inputs have shape {list(x.shape)}; this model takes [batch, {', '.join(map(str, want))}]")
        return 2
    run, runtime, why = None, "onnxruntime", ""
    if args.runtime in ("auto", "tensorrt"):
        engine = Path(args.engine) if args.engine else HERE / manifest["engine"]["file"]
        try:
            run, runtime = tensorrt_runner(engine, manifest), "tensorrt"
        except (ImportError, RuntimeError, OSError) as e:
            why = f"TensorRT cannot run here: {type(e).__name__}: {e}"
            if args.runtime == "tensorrt":
                say(why)
                return 2
            say(f"{why}; running {manifest['model']} with ONNX Runtime on the CPU instead")
    if run is None:
        run = onnxruntime_runner(manifest, args.threads)
    start = time.perf_counter()
    y = run(x)
    seconds = time.perf_counter() - start
    np.save(args.output, y)
    if args.report:
        Path(args.report).write_text(json.dumps({"runtime": runtime, "fallback_reason": why, "examples": len(x),
                                                 "seconds": seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
