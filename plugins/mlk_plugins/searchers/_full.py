"""Shared machinery of searchers that train every trial once, to ``max_resource``."""

from __future__ import annotations

from typing import Any

from mlk.searcher import Searcher, TrialRequest


class FullTrainingSearcher(Searcher):
    """Asks for each configuration of :meth:`configs` in turn, each to ``max_resource`` epochs.

    Subclasses produce configurations lazily through :meth:`next_config` (None when exhausted).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.issued = 0
        self.outstanding: set[int] = set()
        self.results: dict[int, float | None] = {}

    def total(self) -> int:
        return self.config.max_trials

    def next_config(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def ask(self) -> TrialRequest | None:
        if self.issued >= self.total():
            return None
        hparams = self.next_config()
        if hparams is None:
            return None
        self.issued += 1
        req = TrialRequest(self.new_trial_id(), hparams, self.config.max_resource)
        self.outstanding.add(req.trial_id)
        return req

    def tell(self, trial_id: int, resource: int, value: float | None) -> None:
        self.outstanding.discard(trial_id)
        self.results[trial_id] = value

    def is_finished(self) -> bool:
        return not self.outstanding and self.issued >= self.total()

    def budget(self) -> int:
        return self.total() * self.config.max_resource

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "issued": self.issued, "outstanding": sorted(self.outstanding),
                "results": {str(k): v for k, v in self.results.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.issued = state["issued"]
        self.outstanding = set(state["outstanding"])
        self.results = {int(k): v for k, v in state["results"].items()}
