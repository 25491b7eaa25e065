"""``torch``: trains a PyTorch model on CPU, epoch by epoch, with safetensors checkpoints.

This module stays light: torch loads only when a trial trains (``_impl``). A custom training
loop subclasses :class:`TorchTrial` (importable from here) and is named in ``framework.trial``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from mlk.framework import Framework
from mlk.sections import FrameworkConfig

if TYPE_CHECKING:
    from pathlib import Path

    from mlk.compiler import Artifact, Runner
    from mlk.trial import TrialContext

#: Names served from ``_impl`` on first access, so ``from mlk_plugins.frameworks.torch import
#: TorchTrial`` works without importing torch when this module is merely loaded.
_LAZY = ("TorchTrial", "augment_images", "shift_images", "flatten_state", "unflatten_state")


class TorchOptions(FrameworkConfig):
    """The optimiser and batch options the ``torch`` and ``lightning`` frameworks share."""

    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="the optimisation algorithm")
    lr: float = Field(1e-3, gt=0.0, description="learning rate")
    momentum: float = Field(0.0, ge=0.0, description="momentum (sgd only; adam and adamw ignore it)")
    weight_decay: float = Field(
        0.0, ge=0.0, description="L2 penalty (sgd, adam) or decoupled weight decay (adamw)"
    )
    batch_size: int = Field(32, ge=1, description="training examples per optimisation step")
    eval_batch_size: int = Field(512, ge=1, description="examples per forward pass when evaluating")
    loss: Literal["cross_entropy"] = Field("cross_entropy", description="the training and evaluation loss")


class TorchConfig(TorchOptions):
    """``framework:`` for ``name: torch``. Values may be hyperparameters (``lr: ${hp.lr}``)."""

    trial: str | None = Field(
        None,
        description="'package.module:Class' of a TorchTrial subclass with a custom training loop",
    )


class TorchFramework(Framework):
    """Trains ``ctx``'s model with :class:`TorchTrial` (or ``framework.trial``'s subclass of it).

    Each epoch: shuffle (and augment) with the epoch's seed, train, evaluate on val, report
    ``train_loss``, ``val_loss`` and ``val_accuracy``, and checkpoint model and optimiser as
    safetensors + JSON (never pickle). A resumed trial is bit-identical to an uninterrupted one
    when ``reproducibility.deterministic`` is on. With ``resources.slots_per_trial: N`` the same
    loop runs under DistributedDataParallel on N processes, each on its shard of every batch.
    """

    name = "torch"
    Config: ClassVar[type[TorchConfig]] = TorchConfig
    #: DistributedDataParallel over the kernel's rank processes (gloo on CPU, NCCL with GPUs).
    max_slots = 64
    requires = ("torch", "safetensors", "numpy")
    extra = "torch"
    preload = ("torch", "torch._dynamo", "safetensors.torch", "mlk_plugins.frameworks.torch._impl")
    export_format = "torch"
    config: TorchConfig

    def export(self, ctx: TrialContext, resource: int, out: Path) -> Artifact:
        """The model at the trial's checkpoint ``resource`` as a ``torch`` artifact (see
        :mod:`mlk_plugins.frameworks.torch.artifacts`)."""
        from mlk_plugins.frameworks.torch.artifacts import export_trial

        return export_trial(ctx, resource, out)

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        from mlk_plugins.frameworks.torch.artifacts import runner

        return runner(artifact, threads)

    def train(self, ctx: TrialContext) -> None:
        from mlk_plugins.frameworks.torch import ddp
        from mlk_plugins.frameworks.torch._impl import trial_for

        try:
            trial_for(ctx, self.config).run()
        finally:
            if ctx.distributed is not None:
                ddp.leave()

    def evaluate(self, ctx: TrialContext, split: str = "test") -> dict[str, float]:
        """Metrics (``<split>_loss``, ``<split>_accuracy``) of the trial's latest checkpoint on ``split``."""
        from mlk_plugins.frameworks.torch._impl import trial_for

        return trial_for(ctx, self.config).evaluate_checkpoint(split)

    def determinism(self, deterministic: bool) -> dict[str, object]:
        from mlk_plugins.frameworks.torch._impl import set_determinism

        return set_determinism(deterministic)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from mlk_plugins.frameworks.torch import _impl

        return getattr(_impl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
