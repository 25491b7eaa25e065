"""The framework contract (``mlk.frameworks``): the training loop of one trial.

The kernel hands :meth:`Framework.train` a :class:`mlk.trial.TrialContext`. The framework builds
data, model and optimiser from the context's resolved sections, restores the trial's latest
checkpoint if there is one, trains epoch by epoch up to ``ctx.target``, and after each epoch
calls ``ctx.report(epoch, metrics)`` and saves a checkpoint through ``ctx.save_checkpoint``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from mlk.plugin import Plugin
from mlk.sections import FrameworkConfig

if TYPE_CHECKING:
    from mlk.trial import TrialContext


class Framework(Plugin):
    """Base class of framework plugins."""

    Config: ClassVar[type[FrameworkConfig]] = FrameworkConfig
    #: The most workers one trial can use (``resources.slots_per_trial``); 1: no data parallelism.
    max_slots: ClassVar[int] = 1

    def __init__(self, config: FrameworkConfig) -> None:
        self.config = config

    def train(self, ctx: TrialContext) -> None:
        """Train ``ctx``'s trial from its latest checkpoint (or scratch) up to ``ctx.target`` epochs."""
        raise NotImplementedError

    def determinism(self, deterministic: bool) -> dict[str, object]:
        """Switch the framework's deterministic mode; return the flags set, for provenance."""
        return {}
