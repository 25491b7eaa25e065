"""The searcher contract: ask/tell over trials and resources.

The kernel's search loop asks the searcher for work whenever a worker is free and tells it the
metric each time a trial reaches the resource it was asked to train to::

    while not searcher.is_finished():
        req = searcher.ask()            # TrialRequest, or None: nothing to start until a result arrives
        ... run req.trial_id with req.hparams up to req.resource (epochs) ...
        searcher.tell(req.trial_id, req.resource, value)   # value None: the trial failed

A request may name a trial id the searcher used before with a larger resource: the trial then
continues from its own latest checkpoint (multi-fidelity promotion), never from scratch. A
request with ``parent`` starts a new trial from another trial's latest checkpoint (PBT exploit).

Everything a searcher knows must round-trip through :meth:`Searcher.state_dict`, which the kernel
stores after every ``ask`` and ``tell``; a killed search resumes from it.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from mlk.hyperparameters import SearchSpace
from mlk.plugin import Plugin
from mlk.sections import SearcherConfig


@dataclass(frozen=True)
class TrialRequest:
    """Train trial ``trial_id`` with ``hparams`` up to ``resource`` epochs (cumulative)."""

    trial_id: int
    hparams: dict[str, Any]
    resource: int
    parent: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialRequest:
        return cls(**d)


class Searcher(Plugin):
    """Base class of searchers (entry-point group ``mlk.searchers``).

    Subclasses implement :meth:`ask`, :meth:`tell`, :meth:`is_finished`, and extend
    :meth:`state_dict` / :meth:`load_state_dict` with their own state. ``self.rng`` is a
    ``random.Random`` seeded from the run's seed; use it for every random choice and its state is
    saved for you.
    """

    Config: ClassVar[type[SearcherConfig]] = SearcherConfig
    #: Keys of ``searcher:`` that may grow on a resumed search (the saved state stays valid).
    extendable_keys: ClassVar[tuple[str, ...]] = ("max_trials",)

    def __init__(self, config: SearcherConfig, space: SearchSpace, seed: int) -> None:
        self.config = config
        self.space = space
        self.rng = random.Random(seed)
        self.next_trial_id = 1
        #: How many requests the kernel may keep in flight (the backend's capacity); set before the
        #: first ``ask``. Searchers that batch their proposals (nevergrad) read it.
        self.concurrency = 1

    # -- helpers for subclasses -------------------------------------------------------------

    def new_trial_id(self) -> int:
        tid = self.next_trial_id
        self.next_trial_id += 1
        return tid

    def score(self, value: float) -> float:
        """``value`` turned into something to minimise, whatever the spec's ``mode``."""
        return value if self.config.mode == "min" else -value

    # -- the contract -----------------------------------------------------------------------

    @classmethod
    def check_space(cls, config: SearcherConfig, space: SearchSpace) -> None:
        """Reject a search space this searcher cannot search (raise ``UserError``); called at plan time."""

    def ask(self) -> TrialRequest | None:
        """The next piece of work, or None when nothing can start until a result arrives."""
        raise NotImplementedError

    def tell(self, trial_id: int, resource: int, value: float | None) -> None:
        """Trial ``trial_id`` reached ``resource`` with metric ``value`` (None: it failed)."""
        raise NotImplementedError

    def is_finished(self) -> bool:
        """True when the search will ask for nothing more and every request has been told."""
        raise NotImplementedError

    def budget(self) -> int:
        """Total epochs the search expects to spend, for progress and ETA; an estimate is fine."""
        return self.config.max_trials * self.config.max_resource

    def trial_info(self, trial_id: int) -> dict[str, Any]:
        """Searcher facts about a trial for ``mlk runs show`` and plots, e.g. ``{"bracket": 2}``."""
        return {}

    def decisions(self) -> list[dict[str, Any]]:
        """What the searcher decided about trials, in order: mappings with ``trial_id``, ``resource``
        and ``decision`` (``promoted``, ``stopped``, ``replaced``...), plus any detail (``bracket``)."""
        return list(getattr(self, "history", []))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume; JSON-serialisable. Extend, calling ``super()``."""
        version, internal, gauss = self.rng.getstate()
        return {"next_trial_id": self.next_trial_id, "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned. Extend, calling ``super()``."""
        self.next_trial_id = state["next_trial_id"]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
