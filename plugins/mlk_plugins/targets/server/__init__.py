"""``server``: serve a model from a BentoML 1.4 service with adaptive batching, the Open Inference
Protocol v2, Prometheus metrics, canary routing with automatic rollback, and drift monitoring.

The bundle (:mod:`.bundle`) holds the best accepted artifact (ONNX Runtime, ONNX, TVM or the torch
program), its input signature, the drift reference and the serving settings, checksummed; it is also
built into a Bento in the BentoML home under ``MLK_HOME/bentoml``. ``mlk serve NAME`` runs
:mod:`.service` for a registry model: production and canary versions, kept in step with the registry.
This module imports nothing heavy; BentoML loads when a bundle is built or served.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from mlk.compiler import Artifact
from mlk.errors import MlkError, UserError
from mlk.target import MANIFEST, BundleRefused, DeployConfig, DeployInputs, Target

#: Seconds a Bento build may take before it is given up (it imports the service, nothing more).
BENTO_BUILD_TIMEOUT = 300


class ServerConfig(DeployConfig):
    """``deploy:`` entry of ``name: server``."""

    batching: bool = Field(True, description="adaptive batching of concurrent requests (BentoML's dispatcher)")
    max_batch_size: int = Field(32, ge=1, le=4096, description="the most examples one model call takes")
    max_latency_ms: int = Field(200, ge=1, description="the batcher's latency bound; requests that cannot be "
                                                       "answered within it get 503 (overloaded)")
    threads: int = Field(1, ge=1, le=256, description="CPU threads of the model runtime")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="largest request body accepted (413 beyond)")
    max_examples: int = Field(256, ge=1, description="the most examples one request may carry")
    drift_window: int = Field(1000, ge=10, description="live examples the drift scores are computed over")
    drift_threshold: float = Field(0.25, gt=0, description="PSI of inputs or predictions past which the server "
                                                          "logs a drift alert")
    monitor_interval_s: float = Field(10.0, gt=0, description="how often the server writes its drift and "
                                                              "traffic scores to the registry (mlk monitor)")
    bento: bool = Field(True, description="also build a Bento (in MLK_HOME/bentoml) from the bundle")


class ServerTarget(Target):
    """A BentoML model server: JSON predict route, Open Inference Protocol v2, adaptive batching,
    Prometheus metrics, canary split and rollback, drift monitoring."""

    name = "server"
    Config: ClassVar[type[ServerConfig]] = ServerConfig
    accepts = ("onnxruntime", "onnx", "tvm", "torch")
    requires = ("bentoml", "fastapi", "prometheus_client", "numpy")
    extra = "serve"
    config: ServerConfig

    def describe(self, formats: list[str]) -> str:
        c = self.config
        batching = (f"adaptive batching up to {c.max_batch_size} within {c.max_latency_ms} ms" if c.batching
                    else "no batching")
        return f"{self.name}: BentoML service from {' or '.join(formats) or 'nothing'} ({batching})"

    def choose(self, artifacts: dict[str, Artifact]) -> Artifact:
        """The artifact to serve: the first format of ``accepts`` the run has."""
        for fmt in self.accepts:
            if fmt in artifacts:
                return artifacts[fmt]
        raise UserError(f"the server target needs an artifact of format {', '.join(self.accepts)}; the run has "
                        f"{', '.join(sorted(artifacts)) or 'none'}", where="deploy")

    def build(self, artifacts: dict[str, Artifact], out: Path, inputs: DeployInputs) -> Artifact:
        from mlk_plugins.targets.server.bundle import Settings, write_bundle
        from mlk_plugins.targets.server.signature import Signature

        c = self.config
        artifact = self.choose(artifacts)
        meta = dict(artifact.meta)
        if inputs.labels:
            meta["classes"] = list(inputs.labels)
        signature = Signature.from_meta(meta, c.max_examples)
        settings = Settings(batching=c.batching, max_batch_size=c.max_batch_size, max_latency_ms=c.max_latency_ms,
                            threads=c.threads, max_request_bytes=c.max_request_bytes, drift_window=c.drift_window,
                            drift_threshold=c.drift_threshold, monitor_interval_s=c.monitor_interval_s)
        manifest = write_bundle(artifact, out, signature, inputs.reference or {}, settings)
        facts: dict[str, Any] = {
            "artifact_format": artifact.format, "signature": signature.to_json(),
            "settings": vars(settings), "files": manifest["files"],
            "thresholds": {"input_psi": c.drift_threshold, "output_psi": c.drift_threshold},
        }
        if c.bento:
            facts["bento"] = build_bento(out)
        return Artifact("bundle.server", out, facts)

    def check(self, bundle: Artifact, inputs: DeployInputs) -> dict[str, Any]:
        """Load the bundle as the server will (checksums, runner) and answer the held-out split with it."""
        import numpy as np

        from mlk_plugins.targets.server.bundle import Bundle

        try:
            opened = Bundle.open(bundle.path)
            run = opened.runner()
        except MlkError as e:
            raise BundleRefused([str(e)], {"loaded": False}) from None
        report: dict[str, Any] = {"loaded": True, "artifact_format": opened.artifact.format}
        split = getattr(inputs.data, inputs.split, None) if inputs.data is not None else None
        if split is None:
            return report
        x, y = split
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), *opened.signature.input_shape)
        logits = np.concatenate([run(x[i:i + 256]) for i in range(0, len(x), 256)])
        if not np.isfinite(logits).all():
            raise BundleRefused(["the bundle's model gives non-finite outputs on the held-out split"],
                                {**report, "finite": False})
        accuracy = float((logits.argmax(axis=1) == y).mean())
        report.update({"ran": True, "split": inputs.split, "examples": len(x), "accuracy": accuracy})
        validation = opened.artifact.meta.get("validation") or {}
        reference = validation.get("reference_accuracy")
        if reference is not None and inputs.max_metric_drop is not None:
            report["reference_accuracy"] = reference
            if reference - accuracy > inputs.max_metric_drop:
                raise BundleRefused([f"the bundle's model answers the {inputs.split} split with accuracy "
                                     f"{accuracy:.4f}, more than {inputs.max_metric_drop} below the trained "
                                     f"model's {reference:.4f}"], report)
        return report

    def serve(self, model: str, *, home: Path, host: str, port: int, token: str | None) -> None:
        """Replace this process with ``bentoml serve`` of :mod:`.service` for registry model ``model``, so the
        PID the caller holds is the server's (SIGTERM stops it and its worker)."""
        argv, env = serve_command(model, home=home, host=host, port=port, token=token)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(argv[0], argv, env)


def serve_command(model: str, *, home: Path, host: str = "127.0.0.1", port: int = 3000,
                  token: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The command and environment that serve registry model ``model`` (checked to have a production
    version), for :meth:`ServerTarget.serve` and for tests that start servers themselves."""
    from mlk.deployments import Registry
    from mlk_plugins.targets.server.bundle import SERVICE_IMPORT, Bundle

    registry = Registry(home)
    try:
        routing = registry.routing(model)
    finally:
        registry.close()
    if routing.production is None:
        raise UserError(f"model '{model}' has no production version to serve", where="mlk serve",
                        hint=f"promote one: `mlk models promote {model} VERSION`")
    if routing.production.format != "bundle.server":
        raise UserError(f"model '{model}' version {routing.production.version} is a {routing.production.format} "
                        "bundle; only server bundles can be served", where="mlk serve")
    settings = Bundle.open(routing.production.bundle, verify=False).settings
    env = {**os.environ, "MLK_HOME": str(home), "MLK_SERVE_MODEL": model, "BENTOML_DO_NOT_TRACK": "true",
           "BENTOML_HOME": str(Path(home) / "bentoml"), "MLK_SERVE_MAX_BYTES": str(settings.max_request_bytes)}
    env.pop("MLK_SERVE_BUNDLE", None)
    env.pop("MLK_SERVE_TOKEN", None)
    if token:
        env["MLK_SERVE_TOKEN"] = token
    argv = [sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT, "--host", host, "--port", str(port)]
    return argv, env


def build_bento(bundle: Path) -> str:
    """Build the bundle folder into a Bento in ``MLK_HOME/bentoml`` (a subprocess, so BentoML's home is
    set before it is imported); returns the Bento's tag."""
    home = Path(os.environ.get("MLK_HOME") or ".mlk").resolve()
    version = hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()[:20]
    script = ("import bentoml, sys\n"
              "b = bentoml.bentos.build('service:MlkServer', name='mlk-server', version=sys.argv[2], "
              "build_ctx=sys.argv[1], include=['service.py', '*.json', 'model/**'], "
              "labels={'mlk': 'server bundle'})\n"
              "print(b.tag)\n")
    env = {**os.environ, "BENTOML_HOME": str(home / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "MLK_SERVE_BUNDLE": str(bundle)}
    done = subprocess.run([sys.executable, "-c", script, str(bundle), version], env=env, cwd=bundle,
                          capture_output=True, text=True, timeout=BENTO_BUILD_TIMEOUT)
    if done.returncode != 0:
        raise MlkError(f"building the Bento failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip().splitlines()[-1]
