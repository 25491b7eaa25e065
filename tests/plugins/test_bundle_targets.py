"""The jetson and mobile targets on real artifacts of a small digits MLP trained here: the target
conformance suite, the Jetson bundle's runner and build script in fresh processes, and the mobile
check accepting a good TFLite model (float and full int8) and refusing a bad one."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

from tests.plugins.compiler_sources import torch_source, trained_digits

from mlk.compiler import Artifact, CompileInputs
from mlk.registry import registry
from mlk.target import MANIFEST, BundleRefused, DeployInputs, verify_checksums
from mlk.testing.target import TargetContract

MLP = {"name": "digits_mlp", "hidden": 32, "dropout": 0.0}


def _compile(name: str, source: Artifact, out: Path, **options: Any) -> Artifact:
    cls = registry().get("compilers", name, where="compile.name")
    out.mkdir(parents=True)
    _, _, splits = trained_digits(tuple(sorted(MLP.items())))
    inputs = CompileInputs(calibration=splits.train[0][:256], data=splits, threads=1, seed=0)
    artifact: Artifact = cls(cls.Config.model_validate({"name": name, **options})).compile(source, out, inputs)
    return artifact


def _validated(name: str, artifact: Artifact, reference: Any) -> Artifact:
    """``meta["validation"]`` as the kernel's deploy node sets it, measured here on the test split."""
    import numpy as np

    _, _, splits = trained_digits(tuple(sorted(MLP.items())))
    x, y = splits.test
    cls = registry().get("compilers", name, where="compile.name")
    logits = cls(cls.Config.model_validate({"name": name})).runner(artifact, 1)(x)
    acc, ref = float((logits.argmax(1) == y).mean()), float((reference(x).argmax(1) == y).mean())
    artifact.meta["validation"] = {"status": "passed", "node": f"validate/{name}", "accuracy": acc,
                                   "reference_accuracy": ref, "accuracy_drop": ref - acc,
                                   "max_output_diff": float(np.abs(logits - reference(x)).max())}
    return artifact


@functools.lru_cache(maxsize=1)
def _root() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="mlk-bundle-sources-"))


@functools.cache
def sources(kind: str) -> tuple[Artifact, Any]:
    """Real artifacts, made once per test session: ``torch``, ``onnx``, ``tflite``, ``tflite_int8``, ``coreml``."""
    root = _root()
    if kind == "torch":
        (root / "torch").mkdir()
        artifact, reference, _, _ = torch_source(root / "torch", MLP)
        return artifact, reference
    torch_artifact, reference = sources("torch")
    if kind == "onnx":
        return _validated("onnx", _compile("onnx", torch_artifact, root / "onnx"), reference), reference
    if kind in ("tflite", "tflite_int8"):
        onnx, _ = sources("onnx")
        quantize = "int8" if kind == "tflite_int8" else "none"
        artifact = _compile("tflite", onnx, root / kind, quantize=quantize)
        return _validated("tflite", artifact, reference), reference
    artifact = _compile("coreml", torch_artifact, root / "coreml")
    artifact.meta["validation"] = {"status": "not validated", "node": "validate/coreml",
                                   "reason": "CoreML prediction needs macOS"}
    return artifact, reference


def deploy_inputs(max_metric_drop: float | None = 0.02) -> DeployInputs:
    from mlk.drift import reference_stats

    _, meta, splits = trained_digits(tuple(sorted(MLP.items())))
    _, reference = sources("torch")
    x = splits.train[0][:500]
    return DeployInputs(data=splits, reference=reference_stats(x, reference(x), layout=meta["layout"]),
                        labels=meta.get("classes"), threads=1, seed=0, validation={},
                        max_metric_drop=max_metric_drop, split="test")


def _needs(*modules: str) -> None:
    import importlib.util

    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")


class TestJetsonTarget(TargetContract):
    plugin = "jetson"
    config = {"calibration_size": 128, "calibration_batch": 32}

    def artifacts(self, tmp_path: Path) -> tuple[dict[str, Artifact], DeployInputs]:
        _needs("onnx", "onnxscript")
        return {"onnx": sources("onnx")[0]}, deploy_inputs()


class TestMobileTarget(TargetContract):
    plugin = "mobile"

    def artifacts(self, tmp_path: Path) -> tuple[dict[str, Artifact], DeployInputs]:
        _needs("onnx", "onnxscript", "tensorflow", "onnx2tf", "ai_edge_litert", "coremltools")
        return {"tflite": sources("tflite")[0], "coreml": sources("coreml")[0]}, deploy_inputs()


def _jetson_bundle(tmp_path: Path) -> Path:
    _needs("onnx", "onnxscript")
    cls = registry().get("targets", "jetson", where="deploy.name")
    target = cls(cls.Config.model_validate({"name": "jetson", "calibration_size": 96, "calibration_batch": 32}))
    out = tmp_path / "jetson"
    out.mkdir()
    target.build({"onnx": sources("onnx")[0]}, out, deploy_inputs())
    return out


def _has_tensorrt_gpu() -> bool:
    try:
        from mlk_plugins.compilers.tensorrt import load_tensorrt

        load_tensorrt()
    except Exception:
        return False
    return True


def test_jetson_manifest_says_what_the_device_needs(tmp_path: Path) -> None:
    import numpy as np

    out = _jetson_bundle(tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["input"] == {"name": "x", "shape": [64], "dtype": "float32", "layout": "flat",
                                 "dynamic_batch": True}
    assert manifest["requirements"]["tensorrt"] == ">=10.0,<11"  # opset 18: TensorRT 8.x cannot parse it
    assert manifest["requirements"]["jetpack"].startswith(">=6.1") and manifest["onnx_opset"] == 18
    assert manifest["engine"]["precision"] == "fp16" and manifest["engine"]["file"] == "model.fp16.engine"
    assert set(manifest["files"]) >= {"model.onnx", "run.py", "build_engine.py", "calibration/batch_000.npy"}
    batches = manifest["calibration"]["batches"]
    assert len(batches) == 3 and manifest["calibration"]["examples"] == 96
    _, _, splits = trained_digits(tuple(sorted(MLP.items())))
    assert np.array_equal(np.load(out / batches[1]), splits.train[0][32:64])
    assert manifest["preprocessing"]["range"] == [0.0, 1.0] and len(manifest["preprocessing"]["mean"]) == 64
    assert manifest["labels"] == [str(i) for i in range(10)]


def test_jetson_runner_falls_back_to_onnxruntime_and_says_so(tmp_path: Path) -> None:
    import numpy as np

    out = _jetson_bundle(tmp_path)
    _, _, splits = trained_digits(tuple(sorted(MLP.items())))
    x = splits.test[0][:50]
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, str(out / "run.py"), "--input", str(tmp_path / "x.npy"), "--output",
                           str(tmp_path / "y.npy"), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if _has_tensorrt_gpu():
        pytest.skip("TensorRT runs here: no fallback to see")
    assert "TensorRT cannot run here" in proc.stderr and "with ONNX Runtime on the CPU instead" in proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["runtime"] == "onnxruntime" and report["examples"] == 50
    onnx, _ = sources("onnx")
    expected = registry().get("compilers", "onnx", where="x")(
        registry().get("compilers", "onnx", where="x").Config(name="onnx")).runner(onnx, 1)(x)
    assert np.abs(np.load(tmp_path / "y.npy") - expected).max() < 1e-5
    refused = subprocess.run([sys.executable, str(out / "run.py"), "--input", str(tmp_path / "x.npy"), "--output",
                              str(tmp_path / "y.npy"), "--runtime", "tensorrt"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "TensorRT cannot run here" in refused.stderr


def test_jetson_runner_refuses_a_changed_model_and_a_wrong_shape(tmp_path: Path) -> None:
    import numpy as np

    out = _jetson_bundle(tmp_path)
    np.save(tmp_path / "bad.npy", np.zeros((4, 63), np.float32))
    cmd = [sys.executable, str(out / "run.py"), "--input", str(tmp_path / "bad.npy"), "--output", str(tmp_path / "y")]
    wrong = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "this model takes [batch, 64]" in wrong.stderr
    model = out / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    damaged = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert damaged.returncode == 3 and "model.onnx does not match the manifest's sha256" in damaged.stderr


@pytest.mark.skipif(_has_tensorrt_gpu(), reason="TensorRT and a GPU are here: the engine test below runs instead")
def test_jetson_build_script_says_what_is_missing_here(tmp_path: Path) -> None:
    out = _jetson_bundle(tmp_path)
    proc = subprocess.run([sys.executable, str(out / "build_engine.py"), "--precision", "int8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot build a TensorRT engine here" in proc.stderr
    assert "tensorrt" in proc.stderr and not list(out.glob("*.engine"))


@pytest.mark.skipif(not _has_tensorrt_gpu(), reason="needs an NVIDIA GPU with TensorRT and cuda-python (none here)")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_jetson_engine_builds_and_runs_on_a_gpu(tmp_path: Path, precision: str) -> None:
    import numpy as np

    out = _jetson_bundle(tmp_path)
    built = subprocess.run([sys.executable, str(out / "build_engine.py"), "--precision", precision],
                           capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr
    assert (out / f"model.{precision}.engine").is_file()
    if precision == "int8":
        assert (out / "calibration.cache").is_file()
    _, _, splits = trained_digits(tuple(sorted(MLP.items())))
    x, y = splits.test
    np.save(tmp_path / "x.npy", x)
    ran = subprocess.run([sys.executable, str(out / "run.py"), "--input", str(tmp_path / "x.npy"), "--output",
                          str(tmp_path / "y.npy"), "--runtime", "tensorrt", "--engine",
                          str(out / f"model.{precision}.engine")], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    reference = sources("onnx")[0].meta["validation"]["reference_accuracy"]
    assert float((np.load(tmp_path / "y.npy").argmax(1) == y).mean()) > reference - 0.03


def _mobile(tmp_path: Path, tflite: Artifact, max_metric_drop: float | None = 0.02) -> tuple[Any, Artifact, Any]:
    _needs("onnx", "onnxscript", "tensorflow", "onnx2tf", "ai_edge_litert")
    cls = registry().get("targets", "mobile", where="deploy.name")
    target = cls(cls.Config.model_validate({"name": "mobile"}))
    out = tmp_path / "mobile"
    out.mkdir(parents=True)
    inputs = deploy_inputs(max_metric_drop)
    return target, target.build({"tflite": tflite}, out, inputs), inputs


def test_mobile_check_feeds_full_int8_models_as_the_manifest_says(tmp_path: Path) -> None:
    _needs("tensorflow", "onnx2tf", "ai_edge_litert")
    target, bundle, inputs = _mobile(tmp_path, sources("tflite_int8")[0])
    android = json.loads((bundle.path / MANIFEST).read_text())["android"]
    assert android["input"]["dtype"] == "int8" and android["input"]["scale"] > 0 and android["validated"]
    assert "ios" not in json.loads((bundle.path / MANIFEST).read_text())
    report = target.check(bundle, inputs)
    assert report["ran"] and report["runtime"].startswith("LiteRT")
    assert abs(report["accuracy"] - android["validation"]["accuracy"]) < 1e-9  # same model, same data, same feed


def test_mobile_check_refuses_a_model_that_lost_accuracy(tmp_path: Path) -> None:
    _needs("tensorflow", "onnx2tf", "ai_edge_litert", "onnxscript")
    import torch

    from mlk_plugins.frameworks.torch.artifacts import write_artifact

    good, _ = sources("tflite")
    module, meta, _ = trained_digits(tuple(sorted(MLP.items())))
    damaged = module  # the trained model with its rows permuted: each layer's units (and the classes) shuffled
    state = {k: v.clone() for k, v in damaged.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    scrambled = {k: v[torch.randperm(v.shape[0], generator=generator)] if v.ndim == 2 else v for k, v in state.items()}
    folder = tmp_path / "scrambled-torch"
    folder.mkdir()
    damaged.load_state_dict(scrambled)
    try:
        source = write_artifact(damaged, folder, None, meta, {"model": MLP, "meta": meta}, "scrambled")
    finally:
        damaged.load_state_dict(state)
    onnx = _compile("onnx", source, tmp_path / "onnx")
    bad = _compile("tflite", onnx, tmp_path / "tflite")
    bad.meta["validation"] = dict(good.meta["validation"])  # what the good model scored: the bar it must meet
    target, bundle, inputs = _mobile(tmp_path, bad)
    with pytest.raises(BundleRefused) as refused:
        target.check(bundle, inputs)
    assert "points under the trained model's" in str(refused.value)
    assert refused.value.report["accuracy_drop"] > 0.02
    _, unchecked, loose = _mobile(tmp_path / "loose", bad, max_metric_drop=None)
    assert target.check(unchecked, loose)["accuracy_drop"] > 0.02  # no gate: reported, not refused


def test_mobile_bundle_without_tflite_says_it_was_not_checked(tmp_path: Path) -> None:
    _needs("coremltools")
    cls = registry().get("targets", "mobile", where="deploy.name")
    target = cls(cls.Config.model_validate({"name": "mobile"}))
    out = tmp_path / "ios-only"
    out.mkdir()
    bundle = target.build({"coreml": sources("coreml")[0]}, out, deploy_inputs())
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["ios"]["validated"] is False and "macOS" in manifest["ios"]["validation"]["reason"]
    assert any(rel.startswith("ios/model.mlpackage/") for rel in manifest["files"])
    assert verify_checksums(out, manifest["files"]) == []
    assert (out / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    report = target.check(bundle, deploy_inputs())
    assert report == {"ran": False, "why": "the bundle has no TFLite model; Core ML cannot run off macOS"}
