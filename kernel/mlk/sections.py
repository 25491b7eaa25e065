"""Base models of the spec's plugin-owned sections.

The kernel validates the top level of a spec (:mod:`mlk.spec`); each plugin validates its own
section with its ``Config`` class, which subclasses one of these bases and adds fields. Every
section forbids unknown keys, so a misspelling is caught with its key path.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SectionConfig(BaseModel):
    """Common base: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="which plugin of the group handles this section")


class FrameworkConfig(SectionConfig):
    """``framework:``: the training framework. Plugins add optimizer, batch size, epochs..."""


class DataConfig(SectionConfig):
    """``data:``: the dataset. ``path`` is where the dataset's files live, when it has any."""

    path: str | None = Field(None, description="where the dataset's files are (archive or folder)")


class ModelConfig(BaseModel):
    """``model:``: a builtin model by ``name``, or any importable callable by ``_target_``.

    Other keys are the model's options; their values may interpolate hyperparameters
    (``hidden: ${hp.hidden}``). A builtin model validates them with its own ``Config``.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str | None = Field(None, description="a model of the mlk.models group")
    target: str | None = Field(
        None, alias="_target_", description="'package.module:callable' (or dotted) building the model"
    )


class SearcherConfig(SectionConfig):
    """``searcher:``: what to optimise and how much to spend."""

    metric: str = Field(description="the reported metric the searcher optimises, e.g. val_loss")
    mode: Literal["min", "max"] = Field("min", description="whether lower or higher metric is better")
    max_trials: int = Field(1, ge=1, description="how many trials (configurations) at most")
    max_resource: int = Field(1, ge=1, description="epochs a trial trains for at most")


class ResourcesConfig(BaseModel):
    """``resources:``: where and how widely trials run. Backends add their own keys."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field("local", description="which plugin of the mlk.backends group runs trials")
    max_concurrent_trials: int = Field(1, ge=1, description="trials running at once")
    slots_per_trial: int = Field(1, ge=1, description="workers (processes or devices) per trial")
    max_restarts: int = Field(1, ge=0, description="times a failed trial is retried from its checkpoint")


class KeepConfig(BaseModel):
    """``storage.keep``: checkpoint retention per trial."""

    model_config = ConfigDict(extra="forbid")

    trial_best: int = Field(1, ge=0, description="best checkpoints kept per trial (by the searcher metric)")
    trial_latest: int = Field(1, ge=0, description="most recent checkpoints kept per trial")


class StorageConfig(SectionConfig):
    """``storage:``: where checkpoints and artifacts live, and how many are kept."""

    name: str = Field("local", description="which plugin of the mlk.storage group stores files")
    keep: KeepConfig = Field(default_factory=lambda: KeepConfig())
    checkpoint_every_s: float = Field(
        30.0, ge=0, description="seconds between a trial's checkpoints within one request; a trial also "
        "saves when it reaches the searcher's target and when asked to stop (0 = every epoch)")


class ValidateConfig(BaseModel):
    """``validate:``: how every compiled artifact is checked against the trained model, and the gates
    that fail its node."""

    model_config = ConfigDict(extra="forbid")

    split: Literal["test", "val"] = Field("test", description="the held-out split the metric is computed on")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], description="batch sizes latency is measured at")
    threads: int = Field(1, ge=1, description="CPU threads every runtime gets (fixed, so latencies compare)")
    warmup: int = Field(5, ge=0, description="untimed runs before timing")
    repeats: int = Field(50, ge=1, description="timed runs per batch size")
    compare_inputs: int = Field(64, ge=1, description="fixed inputs on which outputs are compared")
    max_metric_drop: float | None = Field(
        None, ge=0, description="gate: largest accepted accuracy drop against the trained model (0.01 = 1 point)")
    max_latency_ms: float | None = Field(None, gt=0, description="gate: largest accepted p99 latency at batch 1")
    max_output_diff: float | None = Field(None, gt=0, description="gate: largest accepted max abs output difference")
    max_size_mb: float | None = Field(None, gt=0, description="gate: largest accepted size on disk")
