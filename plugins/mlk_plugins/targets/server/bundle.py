"""The server bundle: one folder that holds everything a server needs to serve a model version.

```
model/            the artifact's files (with its artifact.json)
signature.json    input name, shape, dtype, layout, number of classes, labels
drift.json        the drift reference (mlk.drift.reference_stats of the training data)
settings.json     batching and serving settings (the server target's Config)
service.py        the BentoML entry point, so the folder is also a Bento build context
manifest.json     sha256 and size of every file
```
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlk.compiler import Artifact, Runner
from mlk.errors import MlkError
from mlk.target import MANIFEST, checksums, verify_checksums
from mlk_plugins.targets.server.signature import Signature

MODEL_DIR = "model"
SIGNATURE = "signature.json"
DRIFT = "drift.json"
SETTINGS = "settings.json"
SERVICE = "service.py"
#: The import path of the BentoML service class every bundle runs.
SERVICE_IMPORT = "mlk_plugins.targets.server.service:MlkServer"

SERVICE_SOURCE = '''"""BentoML entry point of an mlk server bundle: `bentoml serve service:MlkServer` in this folder
serves the bundle beside this file (MLK_SERVE_BUNDLE), or a registry model (MLK_HOME, MLK_SERVE_MODEL)."""

import os
from pathlib import Path

os.environ.setdefault("MLK_SERVE_BUNDLE", str(Path(__file__).resolve().parent))

from mlk_plugins.targets.server.service import MlkServer  # noqa: E402

__all__ = ["MlkServer"]
'''


@dataclass
class Settings:
    """How a version is served (from the server target's Config, stored in the bundle).

    Attributes:
        batching: adaptive batching on (else each request runs alone).
        max_batch_size: the most examples one model call takes.
        max_latency_ms: the batcher's latency bound; requests that would miss it get 503.
        threads: CPU threads of the model runtime.
        max_request_bytes: the largest request body accepted (413 beyond).
        drift_window: live examples the drift scores are computed over.
        drift_threshold: PSI past which an alert is logged.
        monitor_interval_s: how often scores go to the registry (``mlk monitor``).
    """

    batching: bool = True
    max_batch_size: int = 32
    max_latency_ms: int = 200
    threads: int = 1
    max_request_bytes: int = 4 << 20
    drift_window: int = 1000
    drift_threshold: float = 0.25
    monitor_interval_s: float = 10.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def write_bundle(artifact: Artifact, out: Path, signature: Signature, reference: dict[str, Any],
                 settings: Settings) -> dict[str, Any]:
    """Write the bundle of ``artifact`` into the empty folder ``out``; returns the manifest."""
    shutil.copytree(artifact.path, out / MODEL_DIR)
    Artifact(artifact.format, out / MODEL_DIR, artifact.meta).save_meta()
    (out / SIGNATURE).write_text(json.dumps(signature.to_json(), indent=1))
    (out / DRIFT).write_text(json.dumps(reference))
    (out / SETTINGS).write_text(json.dumps(asdict(settings), indent=1))
    (out / SERVICE).write_text(SERVICE_SOURCE)
    manifest = {"format": "bundle.server", "artifact_format": artifact.format, "files": checksums(out)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


@dataclass
class Bundle:
    """A bundle folder, verified and read."""

    path: Path
    artifact: Artifact
    signature: Signature
    reference: dict[str, Any]
    settings: Settings

    @classmethod
    def open(cls, path: Path, verify: bool = True, extra_files: bool = False) -> Bundle:
        """Read the bundle at ``path``; with ``verify``, every file must match the manifest (and, unless
        ``extra_files``, no other file may be there: a Bento's source folder also holds BentoML's own)."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise MlkError(f"{path} is not a server bundle (no {MANIFEST})")
        if verify:
            problems = verify_checksums(path, json.loads(manifest_path.read_text())["files"])
            if extra_files:
                problems = [p for p in problems if not p.endswith("not in the manifest")]
            if problems:
                raise MlkError(f"server bundle {path} is damaged: " + "; ".join(problems))
        return cls(path, Artifact.load(path / MODEL_DIR),
                   Signature.from_json(json.loads((path / SIGNATURE).read_text())),
                   json.loads((path / DRIFT).read_text()),
                   Settings.from_json(json.loads((path / SETTINGS).read_text())))

    def runner(self) -> Runner:
        return load_runner(self.artifact, self.settings.threads)


def load_runner(artifact: Artifact, threads: int) -> Runner:
    """Inference on ``artifact``: the runner of the compiler that produces its format, or of the framework
    of that name (a ``torch`` artifact)."""
    from mlk.registry import registry

    reg = registry()
    if artifact.format in reg.names("frameworks"):
        cls = reg.get("frameworks", artifact.format, where=f"artifact format {artifact.format}")
        return cls(cls.Config.model_validate({"name": artifact.format})).runner(artifact, threads)
    for entry in reg.entries("compilers"):
        if not reg.allowed(entry):
            continue
        try:
            cls = entry.load()
        except Exception:  # a broken compiler plugin does not stop serving another format
            continue
        if cls.produces == artifact.format:
            return cls(cls.Config.model_validate({"name": entry.name})).runner(artifact, threads)
    raise MlkError(f"no installed compiler or framework runs artifacts of format {artifact.format!r}")
