"""``python``: a plain Python function as the trial, for custom loops and quick experiments.

The function gets the :class:`mlk.trial.TrialContext` and does everything itself: reads
``ctx.hparams``, trains from ``ctx.restore_checkpoint()`` up to ``ctx.target``, calls
``ctx.report(epoch, metrics)`` each epoch and saves with ``ctx.save_checkpoint(epoch)`` when
``ctx.checkpoint_due(epoch)``::

    framework: {name: python, function: "my_pkg.train:trial"}
"""

from __future__ import annotations

from pydantic import Field

from mlk.framework import Framework
from mlk.imports import import_object
from mlk.sections import FrameworkConfig
from mlk.trial import TrialContext


class PythonConfig(FrameworkConfig):
    function: str = Field(description="'package.module:function' taking the TrialContext")


class PythonFramework(Framework):
    """Calls the spec's function once per trial request."""

    name = "python"
    Config = PythonConfig

    def train(self, ctx: TrialContext) -> None:
        fn = import_object(self.config.function, where="framework.function")
        fn(ctx)
