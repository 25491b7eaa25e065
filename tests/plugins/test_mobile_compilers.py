"""The tflite, coreml and tensorrt compilers on real small models trained on sklearn's digits.

Two models: an MLP on flat 64-feature inputs and a conv net with batch norm on 1x8x8 "nchw"
images, each trained for a few epochs, saved as a torch artifact and exported to ONNX here (the
onnx compiler plugin is tested on its own). TFLite runs here (LiteRT); CoreML packages are built
and their specs checked, but predict only on macOS; TensorRT needs an NVIDIA GPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlk.compiler import Artifact, CompileConfig, CompileInputs, Compiler, Unavailable
from mlk.testing.compiler import CompilerContract
from mlk_plugins.compilers.coreml import CoremlCompiler
from mlk_plugins.compilers.tensorrt import TensorrtCompiler
from mlk_plugins.compilers.tflite import TfliteCompiler

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("onnxscript")

from torch import nn  # noqa: E402

from mlk_plugins.frameworks.torch.artifacts import runner as torch_runner  # noqa: E402
from mlk_plugins.frameworks.torch.artifacts import write_artifact  # noqa: E402

COMPILERS = (TfliteCompiler, CoremlCompiler, TensorrtCompiler)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:coremltools.*",
                                        "ignore:.*LeafSpec.*:FutureWarning")
ROOT = Path(__file__).resolve().parents[2]


def _missing(*modules: str) -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is None for m in modules)


needs_tflite = pytest.mark.skipif(_missing("tensorflow", "onnx2tf", "ai_edge_litert"),
                                  reason="needs the tflite extra (tensorflow, onnx2tf, ai-edge-litert)")
needs_coreml = pytest.mark.skipif(_missing("coremltools"), reason="needs the coreml extra (coremltools)")


def _has_tensorrt_gpu() -> bool:
    from mlk_plugins.compilers.tensorrt import load_tensorrt

    try:
        load_tensorrt()
    except Unavailable:
        return False
    return True


# ---------------------------------------------------------------------------------------------- models


class ConvNet(nn.Module):
    """conv8-BN-ReLU-pool, conv16-BN-ReLU-pool, linear: small, but with everything converters fold."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _digits() -> dict[str, Any]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(y))
    n = int(len(y) * 0.6)
    return {"train": (x[order[:n]], y[order[:n]]), "test": (x[order[n:]], y[order[n:]])}


def _train(module: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(module.parameters(), lr=0.01)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    module.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models are tiny: more threads only contend (and TensorFlow may be loaded)
    try:
        for _ in range(epochs):
            for idx in torch.randperm(len(xs)).split(32):
                opt.zero_grad()
                nn.functional.cross_entropy(module(xs[idx]), ys[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return module.eval()


def _to_onnx(source: Artifact, folder: Path) -> Artifact:
    """The torch artifact's exported program as an ONNX artifact with a dynamic batch axis."""
    folder.mkdir()
    program = torch.export.load(str(source.path / "model.pt2"))
    example = torch.zeros((2, *source.meta["input_shape"]))
    torch.onnx.export(program, (example,), str(folder / "model.onnx"), dynamo=True, input_names=["x"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    artifact = source.derive("onnx", folder, "onnx (test export)", file="model.onnx")
    artifact.save_meta()
    return artifact


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    return _digits()


def _model(kind: str, digits: dict[str, Any], root: Path) -> dict[str, Any]:
    x, y = digits["train"]
    if kind == "mlp":
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        meta = {"input_shape": [64], "num_classes": 10, "layout": "flat"}
        module = _train(module, x, y, epochs=3)
    else:
        torch.manual_seed(0)
        meta = {"input_shape": [1, 8, 8], "num_classes": 10, "layout": "nchw"}
        module = _train(ConvNet(), x.reshape(-1, 1, 8, 8), y, epochs=3)
    (root / "torch").mkdir()
    source = write_artifact(module, root / "torch", None, meta, {}, f"test {kind}")
    shape = (-1, *meta["input_shape"])
    test_x = digits["test"][0].reshape(shape)
    reference = torch_runner(source, 2)(test_x)
    accuracy = float((reference.argmax(1) == digits["test"][1]).mean())
    assert accuracy > 0.85, f"the {kind} did not train ({accuracy:.3f})"
    return {"torch": source, "onnx": _to_onnx(source, root / "onnx"), "test_x": test_x, "reference": reference,
            "calibration": digits["train"][0][:512].reshape(shape)}


@pytest.fixture(scope="module")
def mlp(digits: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _model("mlp", digits, tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="module")
def cnn(digits: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _model("cnn", digits, tmp_path_factory.mktemp("cnn"))


def _compile(cls: type[Compiler], model: dict[str, Any], source: str, out: Path, **options: Any) -> Artifact:
    compiler = cls(cls.Config(name=cls.name, **options))
    out.mkdir()
    inputs = CompileInputs(calibration=model["calibration"], data=None, threads=2, seed=0)
    artifact = compiler.compile(model[source], out, inputs)
    assert artifact.format == cls.produces and artifact.file.exists()
    assert Artifact.load(out).meta == json_round_trip(artifact.meta)
    return artifact


def json_round_trip(meta: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(meta, default=str))


# -------------------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("cls", COMPILERS, ids=lambda c: c.name)
def test_declarations(cls: type[Compiler]) -> None:
    assert cls.name and cls.produces and cls.accepts and cls.extra and cls.requires
    assert cls.__doc__ and cls.__doc__.strip()
    assert issubclass(cls.Config, CompileConfig) and cls.Config.__doc__
    own = {k: f for k, f in cls.Config.model_fields.items() if k not in CompileConfig.model_fields}
    assert own, "a compiler config should declare its options"
    for key, field in own.items():
        assert field.description, f"{cls.name}.{key} has no description"
    assert cls.Config(name=cls.name).name == cls.name
    with pytest.raises(Exception, match="extra"):
        cls.Config(name=cls.name, no_such_option=1)
    assert cls.produces in cls(cls.Config(name=cls.name)).describe(cls.accepts[0])


def test_importing_the_modules_is_cheap() -> None:
    code = ("import sys; import mlk_plugins.compilers.tflite, mlk_plugins.compilers.coreml, "
            "mlk_plugins.compilers.tensorrt; heavy = {'torch', 'tensorflow', 'coremltools', 'onnx2tf', 'tensorrt', "
            "'numpy', 'ai_edge_litert'} & set(sys.modules); print(sorted(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_configs_reject_bad_values() -> None:
    with pytest.raises(Exception, match="quantize"):
        TfliteCompiler.Config(name="tflite", quantize="int4")
    with pytest.raises(Exception, match="minimum_deployment_target"):
        CoremlCompiler.Config(name="coreml", minimum_deployment_target="Android14")
    with pytest.raises(Exception, match="precision"):
        TensorrtCompiler.Config(name="tensorrt", precision="fp8")


# -------------------------------------------------------------------------------------------- tflite


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


@needs_tflite
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_tflite_float_matches_torch(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model = request.getfixturevalue(kind)
    artifact = _compile(TfliteCompiler, model, "onnx", tmp_path / "tflite")
    facts = artifact.meta["tflite"]
    assert facts["quantize"] == "none" and facts["input"]["dtype"] == "float32"
    assert facts["input"]["shape"][0] == -1, "the batch axis should stay dynamic"
    assert facts["input_nhwc"] is (kind == "cnn")
    if kind == "cnn":
        assert facts["input"]["shape"][1:] == [8, 8, 1]
    assert artifact.meta["layout"] == model["torch"].meta["layout"], "runners take the source layout"
    run = TfliteCompiler(TfliteCompiler.Config(name="tflite")).runner(artifact, threads=2)
    x, ref = model["test_x"], model["reference"]
    for batch in (1, 32, 1):
        got = run(x[:batch])
        assert got.shape == (batch, 10) and got.dtype == np.float32
        assert np.abs(got - ref[:batch]).max() <= 1e-4
    everything = run(x)
    diff = float(np.abs(everything - ref).max())
    print(f"tflite float {kind}: max abs diff {diff:.2e} over {len(x)} test inputs")
    assert diff <= 1e-4


@needs_tflite
@pytest.mark.parametrize(("kind", "quantize"), [("cnn", "int8"), ("mlp", "int8"), ("cnn", "dynamic")])
def test_tflite_quantized_agrees_with_torch(kind: str, quantize: str, request: pytest.FixtureRequest,
                                            tmp_path: Path) -> None:
    model = request.getfixturevalue(kind)
    artifact = _compile(TfliteCompiler, model, "onnx", tmp_path / "tflite", quantize=quantize,
                        calibration_size=100)
    facts = artifact.meta["tflite"]
    assert facts["quantize"] == quantize
    if quantize == "int8":
        assert facts["input"]["dtype"] == "int8" and facts["output"]["dtype"] == "int8"
        assert facts["input"]["scale"] > 0 and -128 <= facts["input"]["zero_point"] <= 127
        assert facts["calibration_size"] == 100
    else:
        assert facts["input"]["dtype"] == "float32"
    run = TfliteCompiler(TfliteCompiler.Config(name="tflite", quantize=quantize)).runner(artifact, threads=2)
    x, ref = model["test_x"], model["reference"]
    for batch in (1, 32):
        got = run(x[:batch])
        assert got.shape == (batch, 10) and got.dtype == np.float32
    got = run(x)
    agreement = _agreement(got, ref)
    print(f"tflite {quantize} {kind}: top-1 agreement {agreement:.4f}, max abs diff "
          f"{float(np.abs(got - ref).max()):.3f} over {len(x)} test inputs")
    assert agreement >= 0.95


@needs_tflite
def test_tflite_fixed_batch_rgb_converts_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnx2tf fetches sample images from GitHub for fixed-batch 3-channel inputs; the plugin never lets it."""
    import socket

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                           nn.Linear(4 * 8 * 8, 10)).eval()
    (tmp_path / "onnx").mkdir()
    torch.onnx.export(module, (torch.zeros(2, 3, 8, 8),), str(tmp_path / "onnx" / "model.onnx"), dynamo=True,
                      input_names=["x"], output_names=["logits"], verbose=False)
    source = Artifact("onnx", tmp_path / "onnx", {"input_shape": [3, 8, 8], "num_classes": 10, "layout": "nchw",
                                                  "file": "model.onnx", "steps": ["test"]})

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"the tflite compiler reached for the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    model = {"onnx": source, "calibration": None}
    artifact = _compile(TfliteCompiler, model, "onnx", tmp_path / "tflite")
    assert artifact.meta["tflite"]["input"]["shape"] == [2, 8, 8, 3] and artifact.meta["tflite"]["input_nhwc"]
    x = np.random.default_rng(0).random((5, 3, 8, 8), dtype=np.float32)
    got = TfliteCompiler(TfliteCompiler.Config(name="tflite")).runner(artifact, threads=1)(x)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    assert got.shape == (5, 10) and np.abs(got - expected).max() <= 1e-4, "fixed batch 2: run in padded chunks"


@needs_tflite
def test_tflite_int8_without_calibration_is_a_user_error(mlp: dict[str, Any], tmp_path: Path) -> None:
    from mlk.errors import UserError

    compiler = TfliteCompiler(TfliteCompiler.Config(name="tflite", quantize="int8"))
    inputs = CompileInputs(calibration=None, data=None, threads=1, seed=0)
    with pytest.raises(UserError, match="calibration"):
        compiler.compile(mlp["onnx"], tmp_path, inputs)


# -------------------------------------------------------------------------------------------- coreml


@needs_coreml
@pytest.mark.parametrize(("kind", "precision"), [("cnn", "fp32"), ("cnn", "fp16"), ("mlp", "fp16")])
def test_coreml_package_and_spec(kind: str, precision: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model = request.getfixturevalue(kind)
    artifact = _compile(CoremlCompiler, model, "torch", tmp_path / "coreml", precision=precision)
    assert artifact.file.name == "model.mlpackage" and (artifact.file / "Manifest.json").exists()
    facts = artifact.meta["coreml"]
    shape = model["torch"].meta["input_shape"]
    assert facts["input"]["name"] == "x" and facts["output"]["name"] == "logits"
    assert facts["input"]["shape"][1:] == shape and facts["input"]["batch_range"][0] == 1
    assert facts["input"]["dtype"] == "FLOAT32" and facts["output"]["dtype"] == "FLOAT32"
    assert facts["precision"] == precision and facts["ops"] == sum(facts["op_types"].values())
    ops = facts["op_types"]
    assert "linear" in ops
    if kind == "cnn":
        assert ops["conv"] == 2 and ops["max_pool"] == 2
        assert "batch_norm" not in ops, "batch norm should be folded into the convolutions"
    if precision == "fp16":
        assert ops.get("cast", 0) >= 2, "fp16 compute with float32 input and output casts at both ends"
    else:
        assert "cast" not in ops
    compiler = CoremlCompiler(CoremlCompiler.Config(name="coreml", precision=precision))
    if sys.platform == "darwin":
        got = compiler.runner(artifact, threads=1)(model["test_x"][:32])
        assert _agreement(got, model["reference"][:32]) >= 0.95
    else:
        with pytest.raises(Unavailable, match=r"CoreML prediction needs macOS; the package's spec was checked here: "
                                              r"input 'x' FLOAT32"):
            compiler.runner(artifact, threads=1)


# ------------------------------------------------------------------------------------------ tensorrt


@pytest.mark.skipif(_has_tensorrt_gpu(), reason="TensorRT and an NVIDIA GPU are present here")
def test_tensorrt_unavailable_here(mlp: dict[str, Any], tmp_path: Path) -> None:
    compiler = TensorrtCompiler(TensorrtCompiler.Config(name="tensorrt"))
    inputs = CompileInputs(calibration=mlp["calibration"], data=None, threads=1, seed=0)
    with pytest.raises(Unavailable, match="TensorRT needs an NVIDIA GPU and the tensorrt package; here ") as caught:
        compiler.compile(mlp["onnx"], tmp_path, inputs)
    assert "tensorrt" in str(caught.value)
    assert not list(tmp_path.iterdir()), "nothing is written when it cannot build"
    fake = mlp["onnx"].derive("tensorrt", tmp_path, "tensorrt", file="model.engine",
                              tensorrt={"version": "10.0", "device": "none", "batch_range": [1, 8]})
    with pytest.raises(Unavailable, match="TensorRT needs an NVIDIA GPU"):
        compiler.runner(fake, threads=1)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_tensorrt_gpu(), reason="needs an NVIDIA GPU, TensorRT 8.6-10.x and cuda-python")
@pytest.mark.parametrize(("kind", "precision"), [("mlp", "fp32"), ("cnn", "fp16"), ("cnn", "int8")])
def test_tensorrt_engine_matches_torch(kind: str, precision: str, request: pytest.FixtureRequest,
                                      tmp_path: Path) -> None:
    model = request.getfixturevalue(kind)
    artifact = _compile(TensorrtCompiler, model, "onnx", tmp_path / "trt", precision=precision, max_batch=64)
    facts = artifact.meta["tensorrt"]
    assert facts["batch_range"] == [1, 64] and facts["precision"] == precision
    run = TensorrtCompiler(TensorrtCompiler.Config(name="tensorrt")).runner(artifact, threads=1)
    x, ref = model["test_x"], model["reference"]
    for batch in (1, 32):
        assert run(x[:batch]).shape == (batch, 10)
    got = run(x)  # more than max_batch: the runner splits it
    if precision == "fp32":
        assert np.abs(got - ref).max() <= 1e-4
    else:
        assert _agreement(got, ref) >= 0.95


# ------------------------------------------------------------------- the compiler conformance suite
# These run once the entry points are declared in pyproject.toml and the distribution is reinstalled.


def _registered(name: str) -> bool:
    from importlib.metadata import entry_points

    return name in {e.name for e in entry_points(group="mlk.compilers")}


def _not_registered(name: str) -> Any:
    return pytest.mark.skipif(not _registered(name), reason=f"'{name}' is not registered in mlk.compilers")


DIGITS_MLP = {"name": "digits_mlp", "hidden": 32, "dropout": 0.0}


def _onnx_source(tmp_path: Path) -> tuple[Any, Any, Any, Any]:
    from tests.plugins.compiler_sources import torch_source

    artifact, reference, x, y = torch_source(tmp_path, DIGITS_MLP)
    return _to_onnx(artifact, tmp_path / "onnx"), reference, x, y


@needs_tflite
@_not_registered("tflite")
class TestTfliteContract(CompilerContract):
    plugin = "tflite"

    def source(self, tmp_path: Path) -> tuple[Any, Any, Any, Any]:
        return _onnx_source(tmp_path)


@needs_tflite
@_not_registered("tflite")
class TestTfliteInt8Contract(CompilerContract):
    plugin = "tflite"
    config = {"quantize": "int8", "calibration_size": 128}
    max_diff = 5.0
    min_agreement = 0.95

    def source(self, tmp_path: Path) -> tuple[Any, Any, Any, Any]:
        return _onnx_source(tmp_path)


@needs_coreml
@_not_registered("coreml")
class TestCoremlContract(CompilerContract):
    plugin = "coreml"
    config = {"precision": "fp32"}
    max_diff = 1e-3
    unavailable_here = None if sys.platform == "darwin" else "Core ML predicts only on macOS"

    def source(self, tmp_path: Path) -> tuple[Any, Any, Any, Any]:
        from tests.plugins.compiler_sources import torch_source

        return torch_source(tmp_path, DIGITS_MLP)


@_not_registered("tensorrt")
class TestTensorrtContract(CompilerContract):
    plugin = "tensorrt"
    config = {"precision": "fp32"}
    unavailable_here = None if _has_tensorrt_gpu() else "TensorRT needs an NVIDIA GPU and the tensorrt package"

    def source(self, tmp_path: Path) -> tuple[Any, Any, Any, Any]:
        return _onnx_source(tmp_path)
