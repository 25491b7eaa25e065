"""``mobile``: a bundle for phone apps, from the run's TFLite (Android) and CoreML (iOS) artifacts.

The bundle holds ``android/model.tflite``, ``ios/model.mlpackage``, ``labels.txt`` and
``manifest.json``: the input signature of each model (TFLite models from onnx2tf take NHWC images,
and full-int8 models take int8 with a scale and zero point), the preprocessing the training inputs
had, how each artifact was validated, and the sha256 of every file. CoreML artifacts cannot be run
off macOS, so one that compiled but could not be validated here is bundled and marked
``validated: false``.

Before the bundle is accepted, ``check`` runs the ``.tflite`` in the LiteRT interpreter
(``ai_edge_litert``) on the validation split, in a fresh process, feeding it exactly as the
manifest says, and refuses the bundle when its accuracy drops past ``validate.max_metric_drop``
from the trained model's.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from mlk.compiler import META_FILE, Artifact
from mlk.target import MANIFEST, BundleRefused, DeployConfig, DeployInputs, Target, checksums, verify_checksums
from mlk_plugins.targets.jetson import accuracy_report, preprocessing

ANDROID = "android/model.tflite"
IOS = "ios/model.mlpackage"
LABELS = "labels.txt"


class MobileConfig(DeployConfig):
    """``deploy:`` entry of ``name: mobile``."""


class MobileTarget(Target):
    """A phone bundle: .tflite (Android) and .mlpackage (iOS), labels, signatures, checksummed manifest."""

    name = "mobile"
    Config: ClassVar[type[MobileConfig]] = MobileConfig
    accepts = ("tflite", "coreml")
    accepts_unvalidated = ("coreml",)
    every_format = True
    requires = ("ai_edge_litert", "numpy")
    extra = "tflite"

    def describe(self, formats: list[str]) -> str:
        return f"mobile bundle from {' and '.join(dict.fromkeys(formats))}: model files, labels, manifest; the " \
               "TFLite model is checked on the validation split"

    def build(self, artifacts: dict[str, Artifact], out: Path, inputs: DeployInputs) -> Artifact:
        first = next(iter(artifacts.values()))
        shape = [int(d) for d in first.meta["input_shape"]]
        num_classes = first.meta.get("num_classes")
        labels = inputs.labels or [str(i) for i in range(int(num_classes or 0))]
        (out / LABELS).write_text("".join(f"{label}\n" for label in labels))
        manifest: dict[str, Any] = {
            "bundle": "mlk mobile bundle", "manifest_version": 1,
            "input": {"shape": shape, "dtype": "float32", "layout": first.meta.get("layout")},
            "output": {"num_classes": num_classes, "meaning": "logits; the predicted class is the argmax"},
            "labels": LABELS,
            "preprocessing": preprocessing(inputs, shape),
        }
        if "tflite" in artifacts:
            art = artifacts["tflite"]
            (out / "android").mkdir()
            shutil.copyfile(art.file, out / ANDROID)
            facts = art.meta.get("tflite", {})
            manifest["android"] = {
                "file": ANDROID, "runtime": "TensorFlow Lite / LiteRT", "quantize": facts.get("quantize"),
                "input": {**facts.get("input", {}), "layout": "nhwc" if facts.get("input_nhwc") else "as trained"},
                "output": facts.get("output", {}), "validation": art.meta.get("validation", {}),
                "validated": art.meta.get("validation", {}).get("status") == "passed",
                "steps": art.meta.get("steps", [])}
        if "coreml" in artifacts:
            art = artifacts["coreml"]
            (out / "ios").mkdir()
            shutil.copytree(art.file, out / IOS, ignore=shutil.ignore_patterns(META_FILE))
            facts = art.meta.get("coreml", {})
            manifest["ios"] = {
                "file": IOS, "runtime": "Core ML", "input": {"name": art.meta.get("input_name", "x"), "shape": shape,
                                                               "dtype": "float32"},
                "precision": facts.get("precision"),
                "minimum_deployment_target": facts.get("minimum_deployment_target"),
                "validation": art.meta.get("validation", {}),
                "validated": art.meta.get("validation", {}).get("status") == "passed",
                "steps": art.meta.get("steps", [])}
        manifest["files"] = checksums(out)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return self.bundle(out, files=manifest["files"], platforms=[p for p in ("android", "ios") if p in manifest],
                           input=manifest["input"], labels=labels)

    def check(self, bundle: Artifact, inputs: DeployInputs) -> dict[str, Any]:
        import numpy as np

        manifest = json.loads((bundle.path / MANIFEST).read_text())
        problems = verify_checksums(bundle.path, manifest["files"])
        if problems:
            raise BundleRefused([f"manifest checksums: {p}" for p in problems], {"checksums": problems})
        if "android" not in manifest:
            return {"ran": False, "why": "the bundle has no TFLite model; Core ML cannot run off macOS"}
        if inputs.data is None:
            return {"ran": False, "why": "the run has no dataset to check the bundle on"}
        x, y = getattr(inputs.data, inputs.split)
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1, *manifest["input"]["shape"]))
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            logits, version = pool.submit(run_tflite, str(bundle.path / ANDROID), manifest["android"], x,
                                          inputs.threads).result()
        return accuracy_report(manifest["android"]["validation"], logits, y, inputs,
                               {"runtime": f"LiteRT {version} interpreter"}, "TFLite")


def run_tflite(path: str, android: dict[str, Any], x: Any, threads: int) -> tuple[Any, str]:
    """Logits of the .tflite at ``path`` on ``x`` (float32, as trained), fed and read as the manifest's
    ``android`` section says (layout, dtypes, scales and zero points), as an app would; and LiteRT's
    version."""
    from importlib.metadata import version

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    signature, output = android["input"], android["output"]
    interpreter = Interpreter(model_path=path, num_threads=max(1, threads))
    inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    if signature.get("layout") == "nhwc":
        x = np.moveaxis(x, 1, -1)
    dtype = np.dtype(signature.get("dtype", "float32"))
    if "scale" in signature:
        info = np.iinfo(dtype)
        x = np.clip(np.round(x / signature["scale"]) + signature["zero_point"], info.min, info.max)
    x = np.ascontiguousarray(x, dtype=dtype)
    fixed = int(signature["shape"][0]) if signature.get("shape") and int(signature["shape"][0]) > 0 else None
    step = fixed or 256
    outputs = []
    for start in range(0, len(x), step):
        chunk = x[start:start + step]
        pad = (fixed - len(chunk)) if fixed else 0
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), dtype)])
        if not fixed:
            interpreter.resize_tensor_input(inp["index"], list(chunk.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], chunk)
        interpreter.invoke()
        y = interpreter.get_tensor(outp["index"])
        if "scale" in output:
            y = (y.astype(np.float32) - output["zero_point"]) * np.float32(output["scale"])
        outputs.append(np.array(y[:len(chunk) - pad], dtype=np.float32))
    return np.concatenate(outputs), version("ai-edge-litert")
