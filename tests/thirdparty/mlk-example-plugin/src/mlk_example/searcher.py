"""``sweep``: walk the first hyperparameter from its low end to its high end in ``steps`` steps,
holding the others at their centre."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from mlk.searcher import Searcher, TrialRequest
from mlk.sections import SearcherConfig


class SweepConfig(SearcherConfig):
    steps: int = Field(5, ge=2, description="points along the swept hyperparameter")


class SweepSearcher(Searcher):
    """A one-dimensional sweep; each point is trained to ``max_resource``."""

    name = "sweep"
    Config = SweepConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.issued = 0
        self.pending: set[int] = set()

    def _total(self) -> int:
        return min(self.config.steps, self.config.max_trials)

    def ask(self) -> TrialRequest | None:
        if self.issued >= self._total():
            return None
        first, *_ = self.space.names()
        hp = self.space.params[first]
        point = self.space.center()
        if hp.type in ("int", "double", "log"):
            values = hp.model_copy(update={"count": self.config.steps}).grid()  # in the value domain
            point[first] = values[min(self.issued, len(values) - 1)]
        self.issued += 1
        req = TrialRequest(self.new_trial_id(), point, self.config.max_resource)
        self.pending.add(req.trial_id)
        return req

    def tell(self, trial_id: int, resource: int, value: float | None) -> None:
        self.pending.discard(trial_id)

    def is_finished(self) -> bool:
        return self.issued >= self._total() and not self.pending

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "issued": self.issued, "pending": sorted(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.issued = state["issued"]
        self.pending = set(state["pending"])
