"""The deploy-target contract (``mlk.targets``): turn validated artifacts into a bundle for a place.

A target (``server``, ``jetson``, ``mobile``, or a vendor's) declares the artifact formats it
``accepts``, in preference order. Each entry of the spec's ``deploy:`` list becomes a
``deploy/<id>`` node of the run graph: the kernel hands the target the run's artifacts of those
formats whose validation passed (inserting the compile steps that make one when the spec has
none), the target builds a bundle into an empty folder, optionally checks it (:meth:`Target.check`),
and the kernel stores the bundle, registers it as a new version of a named model
(:mod:`mlk.deployments`) and promotes it as the entry says. ``mlk serve`` runs a registered model
through its target's :meth:`Target.serve`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from mlk.compiler import META_FILE, Artifact
from mlk.errors import MlkError, UserError
from mlk.plugin import Plugin

#: The file every bundle's checksums are listed in (``files``: relative path -> sha256 and size).
MANIFEST = "manifest.json"


class AutoRollback(BaseModel):
    """``deploy[*].auto_rollback``: when a serving target drops a canary by itself."""

    model_config = ConfigDict(extra="forbid")

    max_error_rate: float | None = Field(
        None, ge=0, le=1, description="roll the canary back when its share of failed requests passes this")
    max_p99_ms: float | None = Field(
        None, gt=0, description="roll the canary back when its p99 latency (ms) passes this")
    min_requests: int = Field(
        50, ge=1, description="canary requests seen before either threshold is judged")


class DeployConfig(BaseModel):
    """One entry of ``deploy:``. Targets subclass it to add their own keys."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="which plugin of the mlk.targets group builds the bundle")
    id: str | None = Field(None, description="the deploy node's id (default: its name); needed to use a target twice")
    model: str | None = Field(None, description="the registry model this deployment is a version of (default: the "
                                                "spec's name)")
    promote: Literal["production", "canary", "none"] = Field(
        "production", description="what the new version becomes: production (all traffic), canary (a share of "
                                  "it, beside production) or none (registered only)")
    canary_percent: float = Field(10.0, gt=0, lt=100, description="traffic share of a canary, in percent")
    auto_rollback: AutoRollback | None = Field(
        None, description="thresholds at which a serving target rolls a canary back by itself")


@dataclass
class DeployInputs:
    """What a target may use besides the artifacts.

    Attributes:
        data: the run dataset's :class:`mlk.datasets.DataSplits` (train/val/test numpy), or None.
        reference: drift reference, :func:`mlk.drift.reference_stats` of training inputs and the
            trained (reference) model's outputs on them.
        labels: class names, index order, when the dataset has them.
        threads: CPU threads the target may use.
        seed: a seed for anything random.
        validation: the validate node's report per artifact node id (accuracy, reference
            accuracy, latency, gates...).
        max_metric_drop: the spec's ``validate.max_metric_drop`` (None: no gate).
        split: the held-out split the spec validates on (``validate.split``).
    """

    data: Any
    reference: dict[str, Any]
    labels: list[str] | None
    threads: int
    seed: int
    validation: dict[str, dict[str, Any]]
    max_metric_drop: float | None = None
    split: str = "test"


class BundleRefused(MlkError):
    """:meth:`Target.check` found the bundle unfit (and why); the deploy node fails with the report."""

    def __init__(self, failures: list[str], report: dict[str, Any]) -> None:
        self.failures = failures
        self.report = report
        super().__init__("; ".join(failures))


class Target(Plugin):
    """Base class of deploy targets (entry-point group ``mlk.targets``).

    Attributes:
        accepts: artifact formats the target takes, in preference order.
        accepts_unvalidated: formats of ``accepts`` it also takes when their validation could not run
            on this machine (CoreML off macOS); the artifact's ``meta["validation"]`` then says so.
        every_format: the bundle holds one artifact of each accepted format (mobile: Android and iOS),
            so the kernel inserts compile steps for every format the spec does not make; otherwise
            it inserts steps only when the spec makes none of them.
    """

    Config: ClassVar[type[DeployConfig]] = DeployConfig
    accepts: ClassVar[tuple[str, ...]] = ()
    accepts_unvalidated: ClassVar[tuple[str, ...]] = ()
    every_format: ClassVar[bool] = False

    def __init__(self, config: DeployConfig) -> None:
        self.config = config

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this target cannot build here, or None. The default names missing requirements."""
        missing = cls.missing_requirements()
        if not missing:
            return None
        return f"target {cls.name} needs {', '.join(missing)}, which is not installed here; {cls.install_hint()}"

    def describe(self, formats: list[str]) -> str:
        """One line for ``mlk graph``: what this target would build from artifacts of ``formats``."""
        return f"{self.name} bundle from {' or '.join(formats) or 'nothing'}"

    def build(self, artifacts: dict[str, Artifact], out: Path, inputs: DeployInputs) -> Artifact:
        """Build the bundle into the empty folder ``out`` from the run's validated artifacts (format ->
        :class:`Artifact`, only formats of ``accepts`` whose validation passed); return an
        :class:`Artifact` of format ``f"bundle.{self.name}"`` whose ``meta`` holds the facts (files,
        checksums, signature...)."""
        raise NotImplementedError

    def bundle(self, out: Path, **meta: Any) -> Artifact:
        """The :class:`Artifact` :meth:`build` returns: format ``bundle.NAME`` over the folder ``out``."""
        return Artifact(f"bundle.{self.name}", out, dict(meta))

    def check(self, bundle: Artifact, inputs: DeployInputs) -> dict[str, Any]:
        """An acceptance test of the built bundle; returns its report (stored with the version).
        Raise :class:`BundleRefused` when the bundle must not be deployed. Default: no check."""
        return {}

    def serve(self, model: str, *, home: Path, host: str, port: int, token: str | None) -> None:
        """Run the model's server in the foreground until SIGTERM/SIGINT. Targets that do not serve raise
        :class:`UserError`."""
        raise UserError(f"target '{self.name}' builds bundles for a device; it does not serve",
                        where="mlk serve", hint="serve a model deployed with the server target "
                                                "(`mlk deploy RUN --target server`)")


# -- helpers for bundle manifests ------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: Files of a bundle folder its manifest does not list: the manifest itself, and the artifact facts the
#: kernel writes beside it when it stores the bundle.
UNLISTED = (MANIFEST, META_FILE)


def checksums(folder: Path, exclude: tuple[str, ...] = UNLISTED) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "size"}}`` of every file under ``folder`` (folders such as an
    ``.mlpackage`` are listed file by file), except ``exclude``."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in exclude:
            continue
        out[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return out


def verify_checksums(folder: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """Problems found comparing ``folder`` with a manifest's ``files`` (empty: all match)."""
    problems = []
    for rel, want in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    listed = set(files)
    extra = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    problems += [f"{rel}: not in the manifest" for rel in sorted(extra) if rel not in listed and rel not in UNLISTED]
    return problems
