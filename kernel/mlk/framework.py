"""The framework contract (``mlk.frameworks``): the training loop of one trial.

The kernel hands :meth:`Framework.train` a :class:`mlk.trial.TrialContext`. The framework builds
data, model and optimiser from the context's resolved sections, restores the trial's latest
checkpoint if there is one, trains epoch by epoch up to ``ctx.target``, and after each epoch
calls ``ctx.report(epoch, metrics)`` and, when ``ctx.checkpoint_due(epoch)``, saves a checkpoint
through ``ctx.save_checkpoint``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from mlk.plugin import Plugin
from mlk.sections import FrameworkConfig

if TYPE_CHECKING:
    from mlk.compiler import Artifact, Runner
    from mlk.trial import TrialContext


class Framework(Plugin):
    """Base class of framework plugins."""

    Config: ClassVar[type[FrameworkConfig]] = FrameworkConfig
    #: The most workers one trial can use (``resources.slots_per_trial``); 1: no data parallelism.
    max_slots: ClassVar[int] = 1
    #: The artifact format :meth:`export` writes (the source of every compile step); "" if none.
    export_format: ClassVar[str] = ""

    def __init__(self, config: FrameworkConfig) -> None:
        self.config = config

    def train(self, ctx: TrialContext) -> None:
        """Train ``ctx``'s trial from its latest checkpoint (or scratch) up to ``ctx.target`` epochs."""
        raise NotImplementedError

    def export(self, ctx: TrialContext, resource: int, out: Path) -> Artifact:
        """Write the trial's model, as trained to ``resource`` epochs (its checkpoint there), into the
        empty folder ``out`` as an artifact of :attr:`export_format`, with ``input_shape``,
        ``input_name``, ``dtype``, ``num_classes`` and ``file`` in its meta."""
        raise NotImplementedError(f"framework '{self.name}' cannot export models")

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        """Load an artifact of :attr:`export_format` for inference (the reference in validation)."""
        raise NotImplementedError(f"framework '{self.name}' cannot run exported models")

    def determinism(self, deterministic: bool) -> dict[str, object]:
        """Switch the framework's deterministic mode; return the flags set, for provenance."""
        return {}
