"""``lightning``: a LightningModule trained by a ``Trainer`` that mlk drives.

The module is the spec's model: a zoo model (built for torch and wrapped in
:class:`~mlk_plugins.frameworks.lightning._impl.MlkModule`, which trains it with the ``framework:``
optimiser options) or a ``model._target_`` that returns a LightningModule of the user's own. This
module stays light: Lightning (~6 s to import) loads only when a trial trains (``_impl``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from mlk.framework import Framework
from mlk_plugins.frameworks.torch import TorchOptions

if TYPE_CHECKING:
    from pathlib import Path

    from mlk.compiler import Artifact, Runner
    from mlk.trial import TrialContext


class LightningConfig(TorchOptions):
    """``framework:`` for ``name: lightning``: the optimiser and batches of a zoo model's wrapper (a
    user's LightningModule configures its own optimiser and ignores ``optimizer``, ``lr``,
    ``momentum`` and ``weight_decay``). Values may be hyperparameters (``lr: ${hp.lr}``)."""


class LightningFramework(Framework):
    """Trains the spec's model under ``pytorch_lightning.Trainer``.

    Each epoch the Trainer trains on batches mlk draws with the epoch's seed and validates; a
    callback reports ``callback_metrics`` (``train_loss``, ``val_loss``, ``val_accuracy`` for a zoo
    model) and saves Lightning's full checkpoint (weights, optimiser, loop state) through mlk's
    storage as safetensors + JSON, never pickle. A request resumes from the trial's latest
    checkpoint, bit-identically when ``reproducibility.deterministic`` is on. With
    ``resources.slots_per_trial: N`` the Trainer runs Lightning's DDP strategy over the kernel's N
    rank processes. Exports the ``torch`` artifact, so every compiler chains unchanged.
    """

    name = "lightning"
    Config: ClassVar[type[LightningConfig]] = LightningConfig
    requires = ("pytorch_lightning", "torch", "safetensors", "numpy")
    extra = "lightning"
    export_format = "torch"
    #: Lightning's DDP strategy over the kernel's rank processes.
    max_slots = 64
    #: Imported once in the local backend's fork server (they start no threads at import).
    preload = ("torch", "safetensors.torch", "pytorch_lightning", "mlk_plugins.frameworks.lightning._impl")
    config: LightningConfig

    def train(self, ctx: TrialContext) -> None:
        from mlk_plugins.frameworks.lightning._impl import train

        train(ctx, self.config)

    def export(self, ctx: TrialContext, resource: int, out: Path) -> Artifact:
        """The network at the trial's checkpoint ``resource`` as a ``torch`` artifact."""
        from mlk_plugins.frameworks.lightning._impl import export_trial

        return export_trial(ctx, self.config, resource, out)

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        from mlk_plugins.frameworks.torch.artifacts import runner

        return runner(artifact, threads)

    def determinism(self, deterministic: bool) -> dict[str, object]:
        from mlk_plugins.frameworks.lightning._impl import set_determinism

        return set_determinism(deterministic)
