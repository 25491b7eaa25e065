"""``jetson``: a bundle for an NVIDIA Jetson board, built from the run's validated ONNX model.

TensorRT engines only run on the GPU model and TensorRT version that built them, so the engine is
built on the board: the bundle holds ``model.onnx``, ``build_engine.py`` (TensorRT builder, fp16 by
default, int8 with entropy calibration), ``run.py`` (runs the engine, or ``model.onnx`` with ONNX
Runtime when TensorRT is missing, and says so), calibration inputs and ``manifest.json`` (TensorRT
and JetPack requirements, input signature, preprocessing, sha256 of every file).

int8 calibration: the bundle ships training inputs as ``calibration/batch_NNN.npy`` and the script
calibrates on the device, writing ``calibration.cache`` there. A cache written here would have to
contain TensorRT's own per-tensor scales for the network *as TensorRT builds it* (after its layer
fusions, named by its version's rules), which only TensorRT can compute, so none is faked.

``check`` runs the bundle's ``run.py`` in a fresh Python process on the validation split through its
ONNX Runtime fallback (the only runtime here) and refuses the bundle when its accuracy drops past
``validate.max_metric_drop`` from the trained model's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from mlk.compiler import META_FILE, Artifact
from mlk.target import MANIFEST, BundleRefused, DeployConfig, DeployInputs, Target, checksums, verify_checksums

FILES = Path(__file__).resolve().parent / "jetson_files"
MODEL = "model.onnx"
#: Highest ONNX opset TensorRT 8.5/8.6 (JetPack 5.1/6.0) parse; newer opsets need TensorRT 10 (JetPack 6.1+).
TRT8_MAX_OPSET = 17


class JetsonConfig(DeployConfig):
    """``deploy:`` entry of ``name: jetson``."""

    precision: Literal["fp32", "fp16", "int8"] = Field(
        "fp16", description="what build_engine.py builds by default: fp32, fp16 kernels, or int8 (calibrated on "
                            "the device with the shipped training inputs)")
    max_batch: int = Field(32, ge=1, description="largest batch of the engine's optimisation profile")
    workspace_mb: int = Field(1024, ge=16, description="GPU scratch memory TensorRT's builder may use, in MiB")
    calibration_size: int = Field(512, ge=0, description="training inputs shipped for int8 calibration (0: none)")
    calibration_batch: int = Field(32, ge=1, description="inputs per calibration batch file")


class JetsonTarget(Target):
    """A Jetson bundle: ONNX model, on-device TensorRT build script (fp16, int8), runner, checksummed manifest."""

    name = "jetson"
    Config: ClassVar[type[JetsonConfig]] = JetsonConfig
    accepts = ("onnx",)
    requires = ("onnx", "numpy")
    extra = "onnx"
    config: JetsonConfig

    def describe(self, formats: list[str]) -> str:
        return (f"jetson bundle from {' or '.join(formats)}: model.onnx, build_engine.py ({self.config.precision} "
                f"by default), run.py with an ONNX Runtime fallback, manifest")

    def build(self, artifacts: dict[str, Artifact], out: Path, inputs: DeployInputs) -> Artifact:
        import numpy as np

        source = artifacts["onnx"]
        cfg = self.config
        for path in source.path.iterdir():  # the model and any external-data file beside it
            if path.is_file() and path.name != META_FILE:
                shutil.copyfile(path, out / (MODEL if path == source.file else path.name))
        for script in ("build_engine.py", "run.py"):
            shutil.copyfile(FILES / script, out / script)
        shape = [int(d) for d in source.meta["input_shape"]]
        batches = []
        if inputs.data is not None and cfg.calibration_size:
            (out / "calibration").mkdir()
            x = np.asarray(inputs.data.train[0][:cfg.calibration_size], dtype=np.float32).reshape(-1, *shape)
            for i in range(0, len(x) - cfg.calibration_batch + 1, cfg.calibration_batch):
                rel = f"calibration/batch_{i // cfg.calibration_batch:03d}.npy"
                np.save(out / rel, np.ascontiguousarray(x[i:i + cfg.calibration_batch]))
                batches.append(rel)
        opset = _opset(out / MODEL)
        tensorrt = ">=10.0,<11" if opset > TRT8_MAX_OPSET else ">=8.5,<11"
        jetpack = ">=6.1 (TensorRT 10.3)" if opset > TRT8_MAX_OPSET else ">=5.1 (TensorRT 8.5; 6.0: 8.6, 6.1+: 10.3)"
        files = checksums(out)
        manifest = {
            "bundle": "mlk jetson bundle", "manifest_version": 1,
            "model": MODEL, "onnx_opset": opset,
            "input": {"name": source.meta.get("input_name", "x"), "shape": shape, "dtype": "float32",
                      "layout": source.meta.get("layout"), "dynamic_batch": source.meta.get("batch_size") is None},
            "output": {"name": source.meta.get("output_name", "logits"), "num_classes": source.meta.get("num_classes"),
                       "meaning": "logits; the predicted class is the argmax"},
            "labels": inputs.labels,
            "preprocessing": preprocessing(inputs, shape),
            "requirements": {
                "tensorrt": tensorrt, "jetpack": jetpack,
                "python": ["numpy", "tensorrt (JetPack's python3-libnvinfer)", "cuda-python (int8 builds and run.py)"],
                "fallback": ["numpy", "onnxruntime"],
            },
            "engine": {"precision": cfg.precision, "file": f"model.{cfg.precision}.engine",
                       "max_batch": cfg.max_batch, "workspace_mb": cfg.workspace_mb,
                       "build": "python build_engine.py [--precision fp16|int8|fp32]"},
            "calibration": {
                "batches": batches, "examples": len(batches) * cfg.calibration_batch, "cache": "calibration.cache",
                "method": "TensorRT IInt8EntropyCalibrator2 on the device over the shipped training inputs; the "
                          "cache it writes is reused by later builds"},
            "validation": source.meta.get("validation", {}),
            "steps": source.meta.get("steps", []),
            "files": files,
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return self.bundle(out, files=files, input=manifest["input"], requirements=manifest["requirements"],
                           engine=manifest["engine"], calibration_examples=manifest["calibration"]["examples"],
                           source_steps=manifest["steps"])

    def check(self, bundle: Artifact, inputs: DeployInputs) -> dict[str, Any]:
        import numpy as np

        manifest = json.loads((bundle.path / MANIFEST).read_text())
        problems = verify_checksums(bundle.path, manifest["files"])
        if problems:
            raise BundleRefused([f"manifest checksums: {p}" for p in problems], {"checksums": problems})
        if inputs.data is None:
            return {"ran": False, "why": "the run has no dataset to check the bundle on"}
        x, y = getattr(inputs.data, inputs.split)
        shape = manifest["input"]["shape"]
        with tempfile.TemporaryDirectory(prefix="mlk-jetson-check-") as tmp:
            np.save(Path(tmp) / "x.npy", np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1, *shape)))
            proc = subprocess.run(
                [sys.executable, str(bundle.path / "run.py"), "--input", f"{tmp}/x.npy", "--output", f"{tmp}/y.npy",
                 "--threads", str(inputs.threads), "--report", f"{tmp}/report.json"],
                capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise BundleRefused([f"run.py exited {proc.returncode}: {proc.stderr.strip()[-500:]}"],
                                    {"stderr": proc.stderr[-2000:]})
            logits = np.load(f"{tmp}/y.npy")
            ran = json.loads(Path(f"{tmp}/report.json").read_text())
        return accuracy_report(manifest.get("validation", {}), logits, y, inputs, ran, "onnx")


def accuracy_report(validation: dict[str, Any], logits: Any, labels: Any, inputs: DeployInputs,
                    ran: dict[str, Any], what: str) -> dict[str, Any]:
    """The check's report: accuracy of the bundle's model on the split against the trained model's;
    :class:`BundleRefused` when the drop passes ``validate.max_metric_drop``."""
    import numpy as np

    accuracy = float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())
    reference = validation.get("reference_accuracy")
    report = {"ran": True, **ran, "split": inputs.split, "examples": len(labels), "accuracy": accuracy,
              "reference_accuracy": reference,
              "accuracy_drop": None if reference is None else reference - accuracy,
              "max_metric_drop": inputs.max_metric_drop}
    gate = inputs.max_metric_drop
    if gate is not None and reference is not None and reference - accuracy > gate:
        raise BundleRefused([f"the bundle's {what} model scores {accuracy:.4f} on {inputs.split}, "
                             f"{(reference - accuracy) * 100:.2f} points under the trained model's {reference:.4f} "
                             f"(validate.max_metric_drop: {gate * 100:.2f} points)"], report)
    return report


def preprocessing(inputs: DeployInputs, shape: list[int]) -> dict[str, Any]:
    """What a device must feed: the dataset's declared preprocessing when it declares one, and the
    range and per-channel (or per-feature) mean and std of the training inputs the model saw."""
    out: dict[str, Any] = {"input": "float32, batch first, shaped as input.shape"}
    if inputs.data is None:
        return out
    import numpy as np

    x = np.asarray(inputs.data.train[0], dtype=np.float64).reshape(-1, *shape)
    if x.ndim != 4:
        x = x.reshape(len(x), -1)
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    declared = inputs.data.meta.get("preprocessing")
    if declared is not None:
        out["declared"] = declared
    out.update({"range": [float(x.min()), float(x.max())],
                "mean": np.round(x.mean(axis=axes), 6).tolist(), "std": np.round(x.std(axis=axes), 6).tolist(),
                "statistics_over": "channels" if x.ndim == 4 else "features",
                "layout": inputs.data.meta.get("layout")})
    return out


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
