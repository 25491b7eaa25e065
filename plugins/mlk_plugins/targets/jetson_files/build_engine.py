"""Build this bundle's TensorRT engine on the device that will run it: ``python build_engine.py``.

TensorRT engines are specific to the GPU and the TensorRT version that build them, so the bundle
ships the ONNX model and this script builds the engine on the Jetson itself (JetPack provides
TensorRT; ``pip install cuda-python`` for int8). ``--precision fp16`` (the manifest's default) lets
TensorRT pick half-precision kernels; ``--precision int8`` calibrates with TensorRT's entropy
calibrator (``IInt8EntropyCalibrator2``) on the training inputs shipped in ``calibration/`` and
writes ``calibration.cache``, which later builds reuse. The engine is written next to this script as
``model.<precision>.engine``; ``run.py`` picks it up. Written against the TensorRT 8.5-10.x Python
API; TensorRT 11 has no fp16/int8 builder flags, so there only ``--precision fp32`` builds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def say(message: str) -> None:
    print(f"build_engine.py: {message}", file=sys.stderr, flush=True)


def verify(manifest: dict[str, Any]) -> None:
    for rel, want in sorted(manifest["files"].items()):
        path = HERE / rel
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != want["sha256"]:
            say(f"{rel} is missing or does not match the manifest's sha256; copy the bundle again")
            raise SystemExit(3)


def load_tensorrt(need_cuda: bool) -> tuple[Any, Any]:
    """``(tensorrt, cudart)``; exits 2 saying what is missing on this machine."""
    problems = []
    trt = cudart = None
    try:
        import tensorrt as trt
    except ImportError as e:
        problems.append(f"the tensorrt Python package cannot be imported ({e}); JetPack installs it "
                        "(python3-libnvinfer), or `pip install tensorrt` on an x86 machine with an NVIDIA GPU")
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
    except ImportError as e:
        if need_cuda:
            problems.append(f"cuda-python cannot be imported ({e}); `pip install cuda-python`")
    if cudart is not None:
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or count == 0:
            problems.append("CUDA sees no GPU")
    if problems:
        say("cannot build a TensorRT engine here: " + "; and ".join(problems))
        raise SystemExit(2)
    return trt, cudart


def calibrator(trt: Any, cudart: Any, batches: list[Path], cache: Path) -> Any:
    """Entropy calibration over the shipped batches (each a .npy of float32 inputs)."""
    import numpy as np

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.arrays = [np.ascontiguousarray(np.load(b, allow_pickle=False), dtype=np.float32) for b in batches]
            self.rows = len(self.arrays[0])
            self.arrays = [a for a in self.arrays if len(a) == self.rows]
            err, self.device = cudart.cudaMalloc(self.arrays[0].nbytes)
            if err != cudart.cudaError_t.cudaSuccess:
                raise RuntimeError(f"cudaMalloc failed: {err}")
            self.next = 0

        def get_batch_size(self) -> int:
            return self.rows

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.next >= len(self.arrays):
                return None
            batch = self.arrays[self.next]
            self.next += 1
            kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            cudart.cudaMemcpy(self.device, batch.ctypes.data, batch.nbytes, kind)
            return [int(self.device)] * len(names)

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, blob: Any) -> None:
            cache.write_bytes(bytes(blob))

        def release(self) -> None:
            cudart.cudaFree(self.device)

    return Calibrator()


def main(argv: list[str] | None = None) -> int:
    manifest = json.loads((HERE / "manifest.json").read_text())
    build = manifest["engine"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=build["precision"])
    p.add_argument("--max-batch", type=int, default=build["max_batch"], help="largest batch the engine takes")
    p.add_argument("--workspace-mb", type=int, default=build["workspace_mb"], help="builder scratch memory (MiB)")
    p.add_argument("--output", help="engine file (default: model.<precision>.engine beside this script)")
    args = p.parse_args(argv)
    verify(manifest)
    if args.precision == "int8" and not manifest["calibration"]["batches"]:
        say("this bundle ships no calibration data (its run had no dataset); build fp16 or fp32")
        return 2
    trt, cudart = load_tensorrt(need_cuda=args.precision == "int8")
    major = int(trt.__version__.split(".")[0])
    if args.precision != "fp32" and major >= 11:
        say(f"TensorRT {trt.__version__} builds strongly typed networks only; use --precision fp32")
        return 2
    shape = manifest["input"]["shape"]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(HERE / manifest["model"])):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        say(f"TensorRT's ONNX parser rejected {manifest['model']}: {errors}")
        return 1
    tensor = network.get_input(0)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, args.workspace_mb << 20)
    dynamic = manifest["input"]["dynamic_batch"]
    if dynamic:
        profile = builder.create_optimization_profile()
        profile.set_shape(tensor.name, (1, *shape), (min(8, args.max_batch), *shape), (args.max_batch, *shape))
        config.add_optimization_profile(profile)
    if args.precision in ("fp16", "int8"):
        if not builder.platform_has_fast_fp16:
            say("this GPU has no fast fp16; TensorRT will mostly pick fp32 kernels")
        config.set_flag(trt.BuilderFlag.FP16)
    calib = None
    if args.precision == "int8":
        batches = [HERE / b for b in manifest["calibration"]["batches"]]
        calib = calibrator(trt, cudart, batches, HERE / manifest["calibration"]["cache"])
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calib
        if dynamic:
            rows = calib.get_batch_size()
            calibration_profile = builder.create_optimization_profile()
            calibration_profile.set_shape(tensor.name, *[(rows, *shape)] * 3)
            config.set_calibration_profile(calibration_profile)
    serialized = builder.build_serialized_network(network, config)
    if calib is not None:
        calib.release()
    if serialized is None:
        say("TensorRT could not build the engine (its log above says why)")
        return 1
    out = Path(args.output) if args.output else HERE / f"model.{args.precision}.engine"
    out.write_bytes(bytes(serialized))
    say(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {args.precision}, TensorRT {trt.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
