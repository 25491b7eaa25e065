"""``asha``: asynchronous successive halving (Li, Jamieson, Rostamizadeh, Gonina, Ben-tzur, Hardt,
Recht and Talwalkar, MLSys 2020), promotion based.

Rungs sit at min_resource * eta**k up to max_resource. Whenever a worker is free, the searcher
promotes a trial that is in the top 1/eta of its rung and not yet promoted (highest rung first);
only when there is none does it start a new configuration. Nobody waits for a rung to fill.
With ``brackets`` > 1, new trials are dealt round-robin to brackets whose lowest rung is
eta**b times higher. A failed trial does not count towards ``max_trials``: it is replaced while
the budget lasts (at most ``max_trials`` failures in all).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, model_validator

from mlk.searcher import Searcher, TrialRequest
from mlk.sections import SearcherConfig


class AshaConfig(SearcherConfig):
    eta: int = Field(3, ge=2, description="reduction factor: the top 1/eta of a rung is promoted")
    min_resource: int = Field(1, ge=1, description="resource (epochs) of the lowest rung")
    brackets: int = Field(1, ge=1, description="brackets with staggered lowest rungs (1: plain ASHA)")
    max_trials: int = Field(64, ge=1, description="configurations to start (failed ones are replaced)")

    @model_validator(mode="after")
    def _resources(self) -> AshaConfig:
        if self.min_resource > self.max_resource:
            raise ValueError(f"min_resource ({self.min_resource}) exceeds max_resource ({self.max_resource})")
        return self


class AshaSearcher(Searcher):
    """ASHA: successive halving without synchronisation; promotes as soon as the top 1/eta allows."""

    name = "asha"
    Config = AshaConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.rungs: list[list[int]] = []
        for b in range(cfg.brackets):
            base = cfg.min_resource * cfg.eta**b
            rungs = []
            r = base
            while r < cfg.max_resource:
                rungs.append(int(r))
                r *= cfg.eta
            rungs.append(cfg.max_resource)
            self.rungs.append(sorted(set(rungs)))
        self.hparams: dict[int, dict[str, Any]] = {}
        self.bracket: dict[int, int] = {}
        self.level: dict[int, int] = {}                       # rung index a trial is at or heading to
        self.results: dict[int, dict[int, float]] = {}        # trial -> rung index -> value
        self.promoted: set[tuple[int, int]] = set()           # (trial, rung index) promoted out of
        self.running: set[int] = set()
        self.started = 0
        self.failed = 0
        self.next_bracket = 0
        self.history: list[dict[str, Any]] = []

    # -- asking ---------------------------------------------------------------------------------

    def _promotable(self) -> tuple[int, int] | None:
        eta = self.config.eta
        best: tuple[int, int] | None = None
        for b, rungs in enumerate(self.rungs):
            for k in range(len(rungs) - 2, -1, -1):
                at_k = [(self.score(v[k]), t) for t, v in self.results.items()
                        if self.bracket[t] == b and k in v and v[k] == v[k]]
                if not at_k:
                    continue
                top = sorted(at_k)[: len(at_k) // eta]
                for _, t in top:
                    if (t, k) not in self.promoted and self.level[t] == k and t not in self.running:
                        if best is None or k > best[1]:
                            best = (t, k)
                        break
        return best

    def ask(self) -> TrialRequest | None:
        found = self._promotable()
        if found is not None:
            t, k = found
            self.promoted.add((t, k))
            self.level[t] = k + 1
            self.running.add(t)
            resource = self.rungs[self.bracket[t]][k + 1]
            self.history.append({"trial_id": t, "bracket": self.bracket[t],
                                 "resource": self.rungs[self.bracket[t]][k], "decision": "promoted"})
            return TrialRequest(t, self.hparams[t], resource)
        if self.started >= self.config.max_trials or self.failed >= self.config.max_trials:
            return None
        tid = self.new_trial_id()
        self.hparams[tid] = self.space.sample(self.rng)
        self.bracket[tid] = self.next_bracket
        self.next_bracket = (self.next_bracket + 1) % len(self.rungs)
        self.level[tid] = 0
        self.results[tid] = {}
        self.running.add(tid)
        self.started += 1
        return TrialRequest(tid, self.hparams[tid], self.rungs[self.bracket[tid]][0])

    # -- telling --------------------------------------------------------------------------------

    def tell(self, trial_id: int, resource: int, value: float | None) -> None:
        self.running.discard(trial_id)
        if value is None:
            self.failed += 1
            self.started -= 1  # replaced while budget remains
            self.results.pop(trial_id, None)
            self.history.append({"trial_id": trial_id, "bracket": self.bracket[trial_id], "resource": resource,
                                 "decision": "failed"})
            return
        self.results[trial_id][self.level[trial_id]] = value

    def is_finished(self) -> bool:
        if self.running:
            return False
        if self.started < self.config.max_trials and self.failed < self.config.max_trials:
            return False
        return self._promotable() is None

    def budget(self) -> int:
        # the expected cost of one bracket-0 trial under ideal promotion, times the trials
        eta, rungs = self.config.eta, self.rungs[0]
        per_trial = sum((r - (rungs[i - 1] if i else 0)) * eta ** -i for i, r in enumerate(rungs))
        return max(1, math.ceil(self.config.max_trials * per_trial))

    def trial_info(self, trial_id: int) -> dict[str, Any]:
        return {"bracket": self.bracket[trial_id]} if trial_id in self.bracket else {}

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "hparams": {str(k): v for k, v in self.hparams.items()},
            "bracket": {str(k): v for k, v in self.bracket.items()},
            "level": {str(k): v for k, v in self.level.items()},
            "results": {str(t): {str(k): v for k, v in r.items()} for t, r in self.results.items()},
            "promoted": sorted([list(p) for p in self.promoted]),
            "running": sorted(self.running),
            "started": self.started, "failed": self.failed, "next_bracket": self.next_bracket,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.hparams = {int(k): v for k, v in state["hparams"].items()}
        self.bracket = {int(k): v for k, v in state["bracket"].items()}
        self.level = {int(k): v for k, v in state["level"].items()}
        self.results = {int(t): {int(k): v for k, v in r.items()} for t, r in state["results"].items()}
        self.promoted = {(t, k) for t, k in state["promoted"]}
        self.running = set(state["running"])
        self.started, self.failed = state["started"], state["failed"]
        self.next_bracket = state["next_bracket"]
        self.history = state["history"]
