"""The backend contract (``mlk.backends``): where trial processes run.

The search loop submits :class:`mlk.trial.TrialTask` objects and collects
:class:`mlk.trial.TrialResult` objects; the backend runs :func:`mlk.trial.run_trial` on each task
somewhere (worker processes here, a Ray cluster elsewhere). A backend never loses a task
silently: a worker that dies yields a failed result naming what happened.

A data-parallel trial (``resources.slots_per_trial: N``) is one task like any other: the worker
that runs it starts and supervises its N rank processes (:mod:`mlk.distributed`), so a backend
needs nothing of its own for it; ``max_concurrent_trials * slots_per_trial`` processes train at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mlk.plugin import Plugin
from mlk.sections import ResourcesConfig

if TYPE_CHECKING:
    from mlk.trial import TrialResult, TrialTask


class Backend(Plugin):
    """Base class of backends. ``config`` is the whole ``resources:`` section."""

    Config: ClassVar[type[ResourcesConfig]] = ResourcesConfig

    def __init__(self, config: ResourcesConfig, home: Path) -> None:
        self.config = config
        self.home = home
        #: Modules the kernel suggests importing once before trials start (the ``preload`` of the
        #: spec's framework, dataset and model plugins); set before :meth:`start`; may be ignored.
        self.preload_modules: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """What this backend would do, for ``mlk graph``: a plan, nothing started. A trial with
        ``slots_per_trial > 1`` is supervised by its worker, which starts that many rank processes
        (:mod:`mlk.distributed`)."""
        return {"backend": self.name, "max_concurrent_trials": self.config.max_concurrent_trials,
                "slots_per_trial": self.config.slots_per_trial}

    def prepare(self) -> None:
        """Begin warming up without blocking (start worker processes importing
        :attr:`preload_modules`, connect to a cluster...). Called on a throwaway instance when a run
        starts, before the nodes ahead of the search, so the warm-up overlaps them; optional, and
        nothing may depend on it having been called."""

    def start(self) -> None:
        """Acquire workers. Called once before the first :meth:`submit`."""

    def capacity(self) -> int:
        """How many tasks may run at once."""
        return self.config.max_concurrent_trials

    def submit(self, task: TrialTask) -> None:
        """Start ``task``; return at once."""
        raise NotImplementedError

    def wait(self, timeout: float | None) -> list[TrialResult]:
        """Results of tasks that ended, waiting up to ``timeout`` seconds for at least one."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop every worker; running tasks are abandoned (they resume from checkpoints later)."""
