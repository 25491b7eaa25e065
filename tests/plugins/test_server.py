"""The server target on real servers: a digits MLP trained for a few epochs, compiled to ONNX Runtime by
mlk's compilers, bundled, registered, and served by ``bentoml serve`` on 127.0.0.1 in a subprocess that
the tests stop by PID. Requests come from clients nobody here wrote: BentoML's ``SyncHTTPClient`` and
``tritonclient.http`` (Open Inference Protocol v2, JSON and binary), plus raw HTTP for malformed input.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("bentoml")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("torch")
pytest.importorskip("tritonclient.http")

from benchmarks.serve import deployed

from mlk.compiler import Artifact
from mlk.deployments import Registry
from mlk.drift import reference_stats
from mlk.errors import MlkError
from mlk.testing.target import TargetContract
from mlk_plugins.targets.server import ServerTarget
from mlk_plugins.targets.server.bundle import Bundle, load_runner
from mlk_plugins.targets.server.signature import BadRequest, Signature
from mlk_plugins.targets.server.v2 import parse_infer

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # tritonclient adds to the headers it is given: pass copies
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A digits MLP trained for 3 epochs as an ONNX Runtime artifact (``a``), the drift reference and the
    data; ``models_b`` adds a second one."""
    root = tmp_path_factory.mktemp("server-models")
    out: dict[str, Any] = {"root": root}
    module, meta, recipe, data = deployed.model("digits_mlp", epochs=3, seed=0)
    out["a"] = deployed.ort_artifact(deployed.torch_artifact(module, meta, recipe, root / "a" / "torch"), root / "a")
    out["data"], out["meta"] = data, meta
    x = out["data"].train[0]
    out["run"] = load_runner(out["a"], 1)
    out["reference"] = reference_stats(x, out["run"](x), layout="flat")
    return out


@pytest.fixture(scope="module")
def models_b(models: dict[str, Any]) -> dict[str, Any]:
    """``models`` with ``b``: another digits MLP (2 epochs, another seed), for canaries."""
    if "b" not in models:
        module, meta, recipe, _ = deployed.model("digits_mlp", epochs=2, seed=1)
        root = models["root"]
        models["b"] = deployed.ort_artifact(deployed.torch_artifact(module, meta, recipe, root / "b" / "torch"),
                                            root / "b")
    return models


def _deploy(home: Path, models: dict[str, Any], key: str = "a", **kw: Any) -> Any:
    """Register and promote a version; a generous batching deadline, since this machine is shared and a
    request past ``max_latency_ms`` is answered 503 by design."""
    kw.setdefault("max_latency_ms", 3000)
    return deployed.deploy(home, "digits", models[key], reference=models["reference"], labels=models["meta"]["classes"],
                           data=models["data"], **kw)


@pytest.fixture(scope="module")
def server(models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A server with a bearer token for model ``digits`` version 1 (batching on)."""
    home = tmp_path_factory.mktemp("server-home")
    _deploy(home, models, max_batch_size=16, max_latency_ms=500, max_request_bytes=256 * 1024)
    proc = deployed.ServerProcess.registry_model(home, "digits", home / "server.log", token=TOKEN).start()
    assert proc.workers, "bentoml serve runs its service in a worker process"
    yield proc
    left = proc.stop()
    assert left == [], f"processes left after SIGTERM to {proc.proc.pid if proc.proc else None}: {left}"


def _post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    host, port = url[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **AUTH, **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _predict(url: str, rows: Any) -> tuple[int, bytes]:
    return _post(url, "/predict", json.dumps({"inputs": np.asarray(rows).tolist()}).encode())


def _get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    host, port = url[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


# -- without a server ------------------------------------------------------------------------------------


def test_bundle_is_checksummed_and_answers_the_test_split(models: dict[str, Any], tmp_path: Path) -> None:
    from mlk.target import DeployInputs

    target = ServerTarget(ServerTarget.Config.model_validate({"name": "server", "bento": False}))
    inputs = DeployInputs(data=models["data"], reference=models["reference"], labels=models["meta"]["classes"],
                          threads=1, seed=0, validation={})
    torch_like = type(models["a"])("torch", models["a"].path, models["a"].meta)
    assert target.choose({"torch": torch_like, "onnxruntime": models["a"]}) is models["a"]
    bundle = target.build({"onnxruntime": models["a"], "torch": torch_like}, tmp_path, inputs)
    assert bundle.format == "bundle.server" and bundle.meta["artifact_format"] == "onnxruntime"
    assert {"model/model.ort.onnx", "signature.json", "drift.json", "settings.json"} <= set(bundle.meta["files"])
    opened = Bundle.open(tmp_path)
    assert opened.signature.input_shape == [64] and opened.signature.labels[3] == "3"
    assert opened.settings.max_batch_size == 32 and opened.reference["kind"] == "features"
    report = target.check(bundle, inputs)
    assert report["examples"] == 360 and report["accuracy"] > 0.8
    (tmp_path / "model" / "model.ort.onnx").write_bytes(b"not a model")
    with pytest.raises(MlkError, match="sha256 differs"):
        Bundle.open(tmp_path)


def test_signature_refuses_what_the_model_cannot_take() -> None:
    sig = Signature(input_name="x", input_shape=[64], num_classes=10, max_examples=8)
    assert sig.check(np.zeros(64)).shape == (1, 64)
    assert sig.check(np.zeros((3, 64), dtype=np.int64)).dtype == np.float32
    bad = {"shape": np.zeros((2, 63)), "NaN": np.full((1, 64), np.nan), "infinite": np.full((1, 64), np.inf),
           "at most 8": np.zeros((9, 64)), "batch of 0": np.zeros((0, 64)), "strings": np.array([["a"] * 64]),
           "booleans": np.ones((1, 64), dtype=bool)}
    for word, array in bad.items():
        with pytest.raises(BadRequest, match=word):
            sig.check(array)
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 256}}]}).encode()
    raw = np.arange(64, dtype="<f4").tobytes()
    parsed = parse_infer(head + raw, str(len(head)), sig)
    assert parsed.batch.tolist() == [list(range(64))]
    with pytest.raises(BadRequest, match="binary_data_size"):
        parse_infer(head + raw[:-4], str(len(head)), sig)


class TestServerTarget(TargetContract):
    """The target conformance suite on an ONNX Runtime artifact of a trained digits MLP."""

    plugin = "server"
    config = {"bento": False}
    serves = True

    def artifacts(self, tmp_path: Path) -> tuple[dict[str, Any], Any]:
        from mlk.target import DeployInputs

        module, meta, recipe, data = deployed.model("digits_mlp", epochs=3, seed=0)
        artifact = deployed.ort_artifact(deployed.torch_artifact(module, meta, recipe, tmp_path / "torch"), tmp_path)
        run = load_runner(artifact, 1)
        x, y = data.test
        accuracy = float((run(x).argmax(1) == y).mean())
        artifact.meta["validation"] = {"status": "passed", "accuracy": accuracy, "reference_accuracy": accuracy}
        reference = reference_stats(data.train[0], run(data.train[0]), layout="flat")
        return {"onnxruntime": artifact}, DeployInputs(data=data, reference=reference, labels=meta["classes"],
                                                       threads=1, seed=0, validation={}, max_metric_drop=0.02)


@pytest.mark.parametrize("fmt", ["torch", pytest.param("tvm", marks=pytest.mark.slow)])
def test_other_formats_are_served_through_their_own_runner(fmt: str, models: dict[str, Any], tmp_path: Path) -> None:
    """A bundle of the torch program (framework runner) or of a TVM library (the tvm compiler's runner)
    answers like the ONNX Runtime one."""
    from mlk.compiler import CompileInputs
    from mlk.target import DeployInputs

    source = Artifact.load(models["a"].path.parent / "torch")
    if fmt == "torch":
        artifact = source
    else:
        pytest.importorskip("tvm")
        from mlk_plugins.compilers.tvm import TvmCompiler

        onnx = Artifact.load(models["a"].path.parent / "onnx")
        (tmp_path / "tvm").mkdir()
        artifact = TvmCompiler(TvmCompiler.Config(name="tvm")).compile(
            onnx, tmp_path / "tvm", CompileInputs(calibration=None, data=None, threads=1, seed=0))
    target = ServerTarget(ServerTarget.Config.model_validate({"name": "server", "bento": False}))
    inputs = DeployInputs(data=models["data"], reference={}, labels=None, threads=1, seed=0, validation={})
    bundle = target.build({fmt: artifact}, tmp_path / "bundle", inputs)
    assert bundle.meta["artifact_format"] == fmt
    x = models["data"].test[0]
    got = Bundle.open(tmp_path / "bundle").runner()(x)
    np.testing.assert_allclose(got, models["run"](x), rtol=1e-4, atol=1e-4)
    assert target.check(bundle, inputs)["accuracy"] > 0.8


def test_check_refuses_a_bundle_that_lost_accuracy(models: dict[str, Any], tmp_path: Path) -> None:
    from mlk.target import BundleRefused, DeployInputs

    target = ServerTarget(ServerTarget.Config.model_validate({"name": "server", "bento": False}))
    artifact = type(models["a"])(models["a"].format, models["a"].path,
                                 {**models["a"].meta, "validation": {"reference_accuracy": 0.999}})
    inputs = DeployInputs(data=models["data"], reference={}, labels=None, threads=1, seed=0, validation={},
                          max_metric_drop=0.01)
    bundle = target.build({"onnxruntime": artifact}, tmp_path, inputs)
    with pytest.raises(BundleRefused, match=r"more than 0\.01 below"):
        target.check(bundle, inputs)


# -- a real server ---------------------------------------------------------------------------------------


def test_clients_get_the_models_answers(server: Any, models: dict[str, Any]) -> None:
    import bentoml
    import tritonclient.http as triton

    x = models["data"].test[0][:40]
    expected = models["run"](x)
    with bentoml.SyncHTTPClient(server.url, token=TOKEN) as client:
        answer = client.predict(inputs=x[:5].tolist())
    assert answer["version"] == "1" and answer["predictions"] == expected[:5].argmax(1).tolist()
    np.testing.assert_allclose(np.array(answer["outputs"]), expected[:5], rtol=1e-5, atol=1e-5)

    tc = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert tc.is_server_live() and tc.is_server_ready()
    assert tc.is_model_ready("digits", headers=dict(AUTH))
    assert "binary_tensor_data" in tc.get_server_metadata(headers=dict(AUTH))["extensions"]
    meta = tc.get_model_metadata("digits", headers=dict(AUTH))
    assert meta["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 64]}
    for binary in (True, False):
        for n in (1, 7, 40):
            tensor = triton.InferInput("x", [n, 64], "FP32")
            tensor.set_data_from_numpy(x[:n], binary_data=binary)
            out = [triton.InferRequestedOutput("logits", binary_data=binary)]
            result = tc.infer("digits", [tensor], outputs=out, headers=dict(AUTH))
            np.testing.assert_allclose(result.as_numpy("logits"), expected[:n], rtol=1e-5, atol=1e-5)
    tensor = triton.InferInput("x", [3, 64], "FP32")
    tensor.set_data_from_numpy(x[:3])
    result = tc.infer("digits", [tensor], model_version="1", headers=dict(AUTH))  # the versioned route
    np.testing.assert_allclose(result.as_numpy("logits"), expected[:3], rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="no loaded version"):
        tc.infer("digits", [tensor], model_version="7", headers=dict(AUTH))
    tc.close()


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server: Any, models: dict[str, Any]) -> None:
    x = models["data"].test[0]
    row = x[0].tolist()
    v2 = "/v2/models/digits/infer"

    def tensor(shape: Any, datatype: str = "FP32", data: Any = None, **extra: Any) -> bytes:
        t = {"name": "x", "shape": shape, "datatype": datatype, "data": data if data is not None else row, **extra}
        return json.dumps({"inputs": [t]}).encode()

    nan_head = json.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 256}}]}).encode()
    nan_raw = np.full(64, np.nan, dtype="<f4").tobytes()
    cases: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("wrong shape", "/predict", json.dumps({"inputs": [row[:10]]}).encode(), {}),
        ("ragged", "/predict", json.dumps({"inputs": [row, row[:3]]}).encode(), {}),
        ("strings", "/predict", json.dumps({"inputs": [["a"] * 64]}).encode(), {}),
        ("booleans", "/predict", json.dumps({"inputs": [[True] * 64]}).encode(), {}),
        ("empty batch", "/predict", json.dumps({"inputs": []}).encode(), {}),
        ("empty body", "/predict", b"", {}),
        ("non-JSON", "/predict", b"\x00\xffnot json at all", {}),
        ("missing inputs", "/predict", json.dumps({"instances": [row]}).encode(), {}),
        ("too large a number", "/predict", json.dumps({"inputs": [[1e300] * 64]}).encode(), {}),
        ("too many examples", "/predict", json.dumps({"inputs": [row] * 300}).encode(), {}),
        ("huge body", "/predict", b'{"inputs": [' + b"0.5, " * 200_000 + b"0.5]}", {}),
        ("bad token", "/predict", json.dumps({"inputs": [row]}).encode(), {"Authorization": "Bearer wrong"}),
        ("v2 wrong shape", v2, tensor([1, 63], data=row[:63]), {}),
        ("v2 wrong dtype", v2, tensor([1, 64], "BYTES", ["a"] * 64), {}),
        ("v2 data count", v2, tensor([2, 64]), {}),
        ("v2 NaN binary", v2, nan_head + nan_raw, {"Inference-Header-Content-Length": str(len(nan_head))}),
        ("v2 short binary", v2, nan_head + nan_raw[:10], {"Inference-Header-Content-Length": str(len(nan_head))}),
        ("v2 bad header length", v2, nan_head, {"Inference-Header-Content-Length": "lots"}),
        ("v2 missing fields", v2, json.dumps({"inputs": [{"name": "x"}]}).encode(), {}),
        ("v2 unknown input", v2, json.dumps({"inputs": [{"name": "y", "shape": [1, 64], "datatype": "FP32",
                                                         "data": row}]}).encode(), {}),
        ("v2 no inputs", v2, b"{}", {}),
        ("v2 non-JSON", v2, b"{{{", {}),
        ("v2 empty", v2, b"", {}),
        ("v2 unknown model", "/v2/models/cats/infer", tensor([1, 64]), {}),
        ("v2 unknown version", "/v2/models/digits/versions/9/infer", tensor([1, 64]), {}),
    ]
    statuses = {}
    for name, path, body, headers in cases:
        status, reply = _post(server.url, path, body, headers)
        statuses[name] = status
        assert 400 <= status < 500, (name, status, reply[:300])
        assert json.loads(reply)["error"], (name, reply[:300])
    assert statuses["bad token"] == 401 and statuses["huge body"] == 413 and statuses["v2 unknown model"] == 404
    status, _ = _post(server.url, "/v2/models/digits/infer", tensor([1, 64]), {"Authorization": ""})
    assert status == 401
    assert _get(server.url, "/metrics")[0] == 401 and _get(server.url, "/metrics", AUTH)[0] == 200
    # still serving, with the right answers
    status, reply = _post(server.url, "/predict", json.dumps({"inputs": x[:4].tolist()}).encode())
    assert status == 200 and json.loads(reply)["predictions"] == models["run"](x[:4]).argmax(1).tolist()
    assert server.proc.poll() is None
    assert not re.search(r"status=5\d\d", server.log()), "no request may end in a server error"
    assert _get(server.url, "/v2/health/ready")[0] == 200 and _get(server.url, "/readyz")[0] == 200


def test_metrics_per_version_and_batching(server: Any, models: dict[str, Any]) -> None:
    x = models["data"].test[0]
    errors: list[Any] = []

    def client(i: int) -> None:
        for j in range(10):
            status, _ = _predict(server.url, x[(i * 10 + j) % len(x)][None])
            if status != 200:
                errors.append(status)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    text = _get(server.url, "/metrics", AUTH)[1].decode()
    ok = _metric(text, 'mlk_requests_total{code="200",model="digits",route="predict",version="1"}')
    assert ok >= 160
    calls = _metric(text, 'mlk_batch_size_count{model="digits",version="1"}')
    examples = _metric(text, 'mlk_batch_size_sum{model="digits",version="1"}')
    assert examples / calls > 1.2, "16 concurrent clients should share model calls"
    assert _metric(text, 'mlk_request_latency_seconds_count{model="digits",version="1"}') >= 160
    assert _metric(text, 'mlk_traffic_percent{model="digits",role="production",version="1"}') == 100
    assert 'mlk_rejected_total{model="digits"' in text
    assert "bentoml_service_request_total" in text  # BentoML's own metrics are still there


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# -- canary, rollback, drift: one server whose registry the tests change ---------------------------------


@pytest.fixture(scope="module")
def lifecycle(models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A server started the way a user does, `mlk serve digits` (which becomes `bentoml serve`)."""
    import os
    import sys

    home = tmp_path_factory.mktemp("lifecycle-home")
    _deploy(home, models, "a", drift_window=200, monitor_interval_s=1.0, drift_threshold=0.25)
    port = deployed.free_port()
    env = {**os.environ, "MLK_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "MLK_SERVE_POLL": "0.5"}
    argv = [sys.executable, "-m", "mlk", "serve", "digits", "--port", str(port)]
    proc = deployed.ServerProcess(argv, env, port, home / "server.log").start()
    proc.home = home
    yield proc
    assert proc.stop() == []


def _mlk(home: Path, *args: str) -> str:
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mlk", *args], env={**os.environ, "MLK_HOME": str(home)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _predict_versions(url: str, x: np.ndarray, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for i in range(n):
        status, reply = _post(url, "/predict", json.dumps({"inputs": [x[i % len(x)].tolist()]}).encode())
        assert status == 200, reply
        seen[json.loads(reply)["version"]] += 1
    return seen


def _wait_for(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the server")


def _serving(url: str) -> list[str]:
    status, reply = _get(url, "/v2/models/digits")
    return json.loads(reply)["versions"] if status == 200 else []


@pytest.mark.slow
def test_canary_split_and_rollback_under_load(lifecycle: Any, models_b: dict[str, Any]) -> None:
    models = models_b
    x = models["data"].test[0]
    _deploy(lifecycle.home, models, "b", promote="canary", canary_percent=25.0)
    _wait_for(lambda: _serving(lifecycle.url) == ["1", "2"])
    seen = _predict_versions(lifecycle.url, x, 400)
    assert abs(seen["2"] / 400 - 0.25) <= 0.05, seen
    text = _get(lifecycle.url, "/metrics")[1].decode()
    assert _metric(text, 'mlk_traffic_percent{model="digits",role="canary",version="2"}') == 25
    assert _metric(text, 'mlk_requests_total{code="200",model="digits",route="predict",version="2"}') >= 80

    # rollback while 8 clients keep sending: no request fails, and the canary stops getting traffic
    failures: list[Any] = []
    answers: list[tuple[float, str]] = []
    stop = threading.Event()

    def client(i: int) -> None:
        k = i
        while not stop.is_set():
            try:
                status, reply = _predict(lifecycle.url, x[k % len(x)][None])
            except OSError as e:
                failures.append(repr(e))
                continue
            if status != 200:
                failures.append((status, reply[:200]))
            else:
                answers.append((time.monotonic(), json.loads(reply)["version"]))
            k += 8

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    rolled = time.monotonic()
    _mlk(lifecycle.home, "models", "rollback", "digits")
    _wait_for(lambda: _serving(lifecycle.url) == ["1"])
    settled = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    before = [v for t, v in answers if t < rolled]
    after = [v for t, v in answers if t > settled + 0.2]
    assert "2" in before and after and set(after) == {"1"}, (Counter(before), Counter(after))


@pytest.mark.slow
def test_automatic_rollback_when_the_canary_is_slow(lifecycle: Any, models_b: dict[str, Any]) -> None:
    models = models_b
    x = models["data"].test[0]
    # a p99 bound no real request meets: the server must drop the canary by itself
    version = _deploy(lifecycle.home, models, "b", promote="canary", canary_percent=50.0,
                      auto_rollback={"max_p99_ms": 0.001, "min_requests": 20})
    _wait_for(lambda: str(version.version) in _serving(lifecycle.url))
    _predict_versions(lifecycle.url, x, 60)
    _wait_for(lambda: _serving(lifecycle.url) == ["1"])
    registry = Registry(lifecycle.home)
    last = registry.history("digits")[-1]
    registry.close()
    assert last["action"] == "rollback canary" and last["previous"] == version.version
    assert "automatic rollback" in last["reason"] and "p99" in last["reason"]
    assert "automatic rollback by the server" in lifecycle.log()
    assert set(_predict_versions(lifecycle.url, x, 20)) == {"1"}


@pytest.mark.slow
def test_drift_rises_on_shifted_inputs_not_on_held_out_ones(lifecycle: Any, models: dict[str, Any]) -> None:
    x = models["data"].test[0]

    def psi() -> float:
        return _metric(_get(lifecycle.url, "/metrics")[1].decode(),
                       'mlk_drift_score{model="digits",score="input_psi",version="1"}')

    for start in range(0, 240, 20):  # held-out digits fill the 200-example window
        assert _predict(lifecycle.url, x[start:start + 20])[0] == 200
    time.sleep(1.2)
    held_out = psi()
    assert 0 < held_out < 0.25
    shifted = np.clip(x + 0.35, 0, 1)
    for start in range(0, 240, 20):
        assert _predict(lifecycle.url, shifted[start:start + 20])[0] == 200
    _wait_for(lambda: psi() > 1.0)
    _wait_for(lambda: "DRIFT ALERT digits version 1" in lifecycle.log())
    registry = Registry(lifecycle.home)
    _wait_for(lambda: any(r["scores"].get("input_psi", 0) > 1.0 for r in registry.monitor("digits")))
    rows = registry.monitor("digits")
    registry.close()
    assert {"input_psi", "input_kl", "output_psi", "output_kl", "requests", "p99_ms"} <= set(rows[0]["scores"])
    assert re.search(r"PSI \d+\.\d+ > threshold 0\.250", lifecycle.log())

    def monitored() -> dict[str, Any]:
        report = json.loads(_mlk(lifecycle.home, "monitor", "digits", "--json"))
        return next(v for v in report["versions"] if v["version"] == 1)

    _wait_for(lambda: monitored()["alert"])  # `mlk monitor` reads what the server wrote
    assert monitored()["checks"]["input_psi"]["threshold"] == 0.25


# -- the Bento ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bento_is_built_offline_and_serves_its_bundle(models: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import subprocess
    import sys

    import tritonclient.http as triton

    from mlk.target import DeployInputs

    monkeypatch.setenv("MLK_HOME", str(tmp_path / "home"))
    target = ServerTarget(ServerTarget.Config.model_validate({"name": "server"}))
    inputs = DeployInputs(data=None, reference=models["reference"], labels=None, threads=1, seed=0, validation={})
    bundle = target.build({"onnxruntime": models["a"]}, tmp_path / "bundle", inputs)
    tag = bundle.meta["bento"]
    assert tag.startswith("mlk-server:")
    bentoml_home = tmp_path / "home" / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("MLK_SERVE_BUNDLE", None)
    listed = subprocess.run([sys.executable, "-m", "bentoml", "list", "-o", "json"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert tag in {b["tag"] for b in json.loads(listed.stdout)}, listed.stdout + listed.stderr
    # the Bento alone (no registry, no MLK_HOME) serves the bundle it holds
    env.pop("MLK_HOME", None)
    port = deployed.free_port()
    argv = [sys.executable, "-m", "bentoml", "serve", tag, "--host", "127.0.0.1", "--port", str(port)]
    with deployed.ServerProcess(argv, env, port, tmp_path / "bento.log") as proc:
        x = models["data"].test[0][:6]
        tc = triton.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = triton.InferInput("x", [6, 64], "FP32")
        tensor.set_data_from_numpy(x)
        result = tc.infer("model", [tensor])
        np.testing.assert_allclose(result.as_numpy("logits"), models["run"](x), rtol=1e-5, atol=1e-5)
        tc.close()
        assert "serving bundle" in proc.log()
    assert not deployed.alive(proc.proc.pid)
