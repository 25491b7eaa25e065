"""``hyperband``: Hyperband (Li, Jamieson, DeSalvo, Rostamizadeh and Talwalkar, JMLR 2018).

Brackets s = s_max .. 0, with s_max = floor(log_eta(R)). Bracket s starts
n = ceil((s_max + 1) / (s + 1) * eta**s) configurations at resource r = R * eta**-s and runs
successive halving: after each rung the best floor(n_i / eta) continue, from their own
checkpoints, to eta times the resource, until R. Brackets run in order, but when the current
bracket waits for a rung to fill, the next one starts, so no worker idles.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from mlk.searcher import Searcher, TrialRequest
from mlk.sections import SearcherConfig


class HyperbandConfig(SearcherConfig):
    eta: int = Field(3, ge=2, description="reduction factor: each rung keeps the best 1/eta")
    max_trials: int = Field(100_000, ge=1, description="cap on the number of configurations (default: no cap)")
    iterations: int = Field(1, ge=1, description="how many times to run the full set of brackets")


def rung_resources(max_resource: int, eta: int, s: int) -> list[int]:
    """Resources of the rungs of bracket ``s``: R * eta**(i - s) for i = 0..s, rounded, at least 1."""
    return [max(1, round(max_resource * eta ** (i - s))) for i in range(s + 1)]


def s_max_of(max_resource: int, eta: int) -> int:
    # the small epsilon keeps exact powers (log_3(81) = 4) from rounding down
    return math.floor(math.log(max_resource) / math.log(eta) + 1e-9)


class Bracket:
    """Successive halving over ``n`` configurations at the rung resources of one bracket."""

    def __init__(self, s: int, n: int, resources: list[int]) -> None:
        self.s = s
        self.n = n
        self.resources = resources
        self.rung = 0
        self.members: list[int] = []           # trial ids alive in the current rung
        self.to_issue: list[int] = []          # trial ids of the current rung not yet requested
        self.results: dict[int, float | None] = {}
        self.started = False

    def keep(self, i: int, eta: int) -> int:
        return max(1, math.floor(self.n * eta ** -(i + 1)))

    def to_dict(self) -> dict[str, Any]:
        return {"s": self.s, "n": self.n, "resources": self.resources, "rung": self.rung, "members": self.members,
                "to_issue": self.to_issue, "results": {str(k): v for k, v in self.results.items()},
                "started": self.started}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bracket:
        b = cls(d["s"], d["n"], d["resources"])
        b.rung, b.members, b.to_issue, b.started = d["rung"], d["members"], d["to_issue"], d["started"]
        b.results = {int(k): v for k, v in d["results"].items()}
        return b


class HyperbandSearcher(Searcher):
    """Hyperband: successive halving over brackets that trade many short trials for few long ones."""

    name = "hyperband"
    Config = HyperbandConfig
    extendable_keys = ("max_trials", "iterations")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        eta, big_r = cfg.eta, cfg.max_resource
        self.s_max = s_max_of(big_r, eta)
        self.brackets: list[Bracket] = []
        for _ in range(cfg.iterations):
            for s in range(self.s_max, -1, -1):
                n = math.ceil((self.s_max + 1) / (s + 1) * eta**s)
                self.brackets.append(Bracket(s, n, rung_resources(big_r, eta, s)))
        self.hparams: dict[int, dict[str, Any]] = {}
        self.trial_bracket: dict[int, int] = {}
        self.created = 0
        self.history: list[dict[str, Any]] = []  # promotions and stops, for `mlk runs show`

    # -- asking ---------------------------------------------------------------------------------

    def _start(self, index: int) -> None:
        b = self.brackets[index]
        b.started = True
        room = self.config.max_trials - self.created
        for _ in range(min(b.n, max(0, room))):
            tid = self.new_trial_id()
            self.hparams[tid] = self.space.sample(self.rng)
            self.trial_bracket[tid] = index
            b.members.append(tid)
            b.to_issue.append(tid)
            self.created += 1

    def ask(self) -> TrialRequest | None:
        for index, b in enumerate(self.brackets):
            if not b.started:
                self._start(index)
            if b.to_issue:
                tid = b.to_issue.pop(0)
                return TrialRequest(tid, self.hparams[tid], b.resources[b.rung])
            if not self._bracket_done(b):
                continue  # waiting for its rung; let the next bracket use the worker
        return None

    def _bracket_done(self, b: Bracket) -> bool:
        last_rung_told = b.rung == len(b.resources) - 1 and all(t in b.results for t in b.members)
        return b.started and not b.to_issue and (not b.members or last_rung_told)

    # -- telling --------------------------------------------------------------------------------

    def tell(self, trial_id: int, resource: int, value: float | None) -> None:
        b = self.brackets[self.trial_bracket[trial_id]]
        b.results[trial_id] = value
        if b.to_issue or not all(t in b.results for t in b.members):
            return
        if b.rung == len(b.resources) - 1:
            return
        # the rung is complete: promote the best, stop the rest
        ranked = sorted(b.members, key=lambda t: (math.inf if b.results[t] is None or b.results[t] != b.results[t]
                                                  else self.score(b.results[t]), t))  # type: ignore[arg-type]
        k = b.keep(b.rung, self.config.eta)
        alive = [t for t in ranked[:k] if b.results[t] is not None]
        for t in b.members:
            self.history.append({"trial_id": t, "bracket": b.s, "resource": b.resources[b.rung],
                                 "decision": "promoted" if t in alive else "stopped"})
        b.rung += 1
        b.members = alive
        b.to_issue = list(alive)
        b.results = {}

    def is_finished(self) -> bool:
        return all(self._bracket_done(b) for b in self.brackets)

    def budget(self) -> int:
        total = 0
        for b in self.brackets:
            n = b.n
            prev = 0
            for i, r in enumerate(b.resources):
                total += n * (r - prev)
                prev = r
                n = b.keep(i, self.config.eta)
        return total

    def trial_info(self, trial_id: int) -> dict[str, Any]:
        """The bracket a trial belongs to (shown by ``mlk runs show``)."""
        index = self.trial_bracket.get(trial_id)
        return {"bracket": self.brackets[index].s} if index is not None else {}

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "brackets": [b.to_dict() for b in self.brackets],
                "hparams": {str(k): v for k, v in self.hparams.items()},
                "trial_bracket": {str(k): v for k, v in self.trial_bracket.items()},
                "created": self.created, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        planned = self.brackets  # from this (possibly larger) config: more iterations add brackets
        self.brackets = [Bracket.from_dict(b) for b in state["brackets"]]
        self.brackets += planned[len(self.brackets):]
        self.hparams = {int(k): v for k, v in state["hparams"].items()}
        self.trial_bracket = {int(k): v for k, v in state["trial_bracket"].items()}
        self.created = state["created"]
        self.history = state["history"]
