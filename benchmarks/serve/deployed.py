"""Real deployed models and real server processes, for the serve benchmark and the server tests.

- :func:`ort_artifact`: a torch model (the ``digits_mlp`` or ``cifar_cnn`` model plugin, trained or
  not) exported through mlk's own compilers (torch -> onnx -> onnxruntime);
- :func:`deploy`: the server target's bundle of it, registered and promoted in a registry;
- :class:`ServerProcess`: ``bentoml serve`` of a registry model on 127.0.0.1, started as a subprocess
  and stopped by PID (SIGTERM, then the check that its worker processes are gone).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlk.compiler import Artifact, CompileInputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torch_artifact(module: Any, meta: dict[str, Any], recipe: dict[str, Any], folder: Path) -> Artifact:
    from mlk_plugins.frameworks.torch.artifacts import write_artifact

    folder.mkdir(parents=True)
    return write_artifact(module, folder, None, meta, {"model": recipe, "meta": meta}, "benchmark source")


def ort_artifact(source: Artifact, folder: Path, calibration: Any = None) -> Artifact:
    """``source`` (torch) through mlk's onnx and onnxruntime compilers."""
    from mlk_plugins.compilers.onnx import OnnxCompiler
    from mlk_plugins.compilers.onnxruntime import OnnxRuntimeCompiler

    inputs = CompileInputs(calibration=calibration, data=None, threads=1, seed=0)
    (folder / "onnx").mkdir(parents=True)
    onnx = OnnxCompiler(OnnxCompiler.Config(name="onnx")).compile(source, folder / "onnx", inputs)
    (folder / "ort").mkdir()
    return OnnxRuntimeCompiler(OnnxRuntimeCompiler.Config(name="onnxruntime")).compile(onnx, folder / "ort", inputs)


def model(name: str, epochs: int = 0, seed: int = 0) -> tuple[Any, dict[str, Any], dict[str, Any], Any]:
    """``(module, meta, recipe, data)`` of a builtin model plugin: ``digits_mlp`` on digits (trained for
    ``epochs``), or ``cifar_cnn`` on random 3x32x32 images (untrained: latency only)."""
    import numpy as np
    import torch

    from mlk.registry import registry
    from mlk.trial import build_model

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    if name == "digits_mlp":
        from mlk_plugins.datasets.digits import DigitsDataset

        data = DigitsDataset(DigitsDataset.Config(name="digits")).load()
        meta = dict(data.meta)
        recipe = {"name": "digits_mlp"}
    else:
        meta = {"input_shape": [3, 32, 32], "num_classes": 10, "layout": "nchw",
                "classes": [f"class{i}" for i in range(10)]}
        recipe = {"name": name}
        data = np.random.default_rng(seed).uniform(0, 1, size=(256, 3, 32, 32)).astype(np.float32)
    module = build_model(registry(), recipe, "torch", meta)
    if epochs:
        from mlk_plugins.compilers.passes import finetune

        finetune(module, data.train[0], data.train[1], epochs=epochs, lr=3e-3, batch_size=64, seed=seed)
    return module.eval(), meta, recipe, data


def deploy(home: Path, name: str, artifact: Artifact, *, reference: dict[str, Any] | None = None,
           labels: list[str] | None = None, promote: str = "production", canary_percent: float | None = None,
           auto_rollback: dict[str, Any] | None = None, data: Any = None, **config: Any) -> Any:
    """Build the server bundle of ``artifact``, check it, register it as a new version of ``name`` in
    ``home``'s registry and promote it; returns the :class:`mlk.deployments.ModelVersion`."""
    import tempfile

    from mlk.deployments import Registry
    from mlk.target import DeployInputs
    from mlk_plugins.targets.server import ServerTarget

    target = ServerTarget(ServerTarget.Config.model_validate({"name": "server", "bento": False, **config}))
    inputs = DeployInputs(data=data, reference=reference or {}, labels=labels, threads=1, seed=0, validation={})
    registry = Registry(home)
    try:
        with tempfile.TemporaryDirectory(prefix="mlk-bundle-") as tmp:
            bundle = target.build({artifact.format: artifact}, Path(tmp), inputs)
            report = target.check(bundle, inputs)
            version = registry.register(name, "benchmark", "server", Path(tmp), bundle.format,
                                        {**bundle.meta, "check": report})
        if promote == "production":
            registry.promote(name, version.version, auto_rollback=auto_rollback)
        elif promote == "canary":
            registry.promote(name, version.version, canary_percent=canary_percent, auto_rollback=auto_rollback)
        return version
    finally:
        registry.close()


def children(pid: int) -> list[int]:
    """PIDs of every descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class ServerProcess:
    """A server on 127.0.0.1 in its own process: started with ``argv``/``env``, stopped by PID."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.argv, self.env, self.port, self.log_path = argv, env, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.workers: list[int] = []

    @classmethod
    def registry_model(cls, home: Path, model: str, log: Path, token: str | None = None,
                       poll: float = 0.5) -> ServerProcess:
        from mlk_plugins.targets.server import serve_command

        port = free_port()
        argv, env = serve_command(model, home=home, host="127.0.0.1", port=port, token=token)
        env["MLK_SERVE_POLL"] = str(poll)
        return cls(argv, env, port, log)

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        self.workers = children(self.proc.pid)
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready within {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> list[int]:
        """SIGTERM to the server's PID; returns the PIDs (server and workers) still alive afterwards."""
        if self.proc is None:
            return []
        workers = self.workers or children(self.proc.pid)
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        left = [p for p in [self.proc.pid, *workers] if alive(p)]
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [p for p in left if alive(p)]
        for pid in left:  # a test must not leave a server behind, even when it fails
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._log.close()
        return left

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()
