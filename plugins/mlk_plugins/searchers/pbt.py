"""``pbt``: population based training (Jaderberg et al., 2017), in synchronous generations.

A population of ``population`` trials trains ``interval`` epochs at a time. After each
generation the bottom ``quantile`` of the population is replaced: each replacement is a new
trial that starts from the checkpoint of a member of the top ``quantile`` (exploit) with that
member's hyperparameters perturbed (explore): numbers multiplied by one of ``factors`` (kept in
range, log ranges on the log scale, integers rounded), categoricals resampled with probability
``resample_probability``; only the hyperparameters listed in ``mutations`` change (architecture
sizes must not: the child loads the parent's weights). The others continue from their own checkpoints. Generations are
synchronous, so a seed gives the same search whatever the concurrency.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from mlk.searcher import Searcher, TrialRequest
from mlk.sections import SearcherConfig


class PbtConfig(SearcherConfig):
    population: int = Field(8, ge=2, description="trials alive at once")
    interval: int = Field(2, ge=1, description="epochs between exploit/explore steps")
    quantile: float = Field(0.25, gt=0.0, le=0.5, description="fraction replaced (bottom) and copied (top)")
    factors: list[float] = Field(default_factory=lambda: [0.8, 1.2], description="perturbation multipliers")
    resample_probability: float = Field(0.25, ge=0.0, le=1.0, description="chance a categorical is resampled")
    max_trials: int = Field(100_000, ge=1, description="cap on the trials created (default: no cap)")
    mutations: list[str] | None = Field(
        None, description="hyperparameters explore may change (default: all); the rest, such as layer sizes "
                          "a checkpoint fixes, are inherited unchanged")


class PbtSearcher(Searcher):
    """Population based training: exploit the best checkpoints, explore around their hyperparameters."""

    name = "pbt"
    Config = PbtConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.members: list[int] = []                   # current population, by trial id
        self.hparams: dict[int, dict[str, Any]] = {}
        self.parent: dict[int, int] = {}
        self.reached: dict[int, int] = {}              # resource each member has reached
        self.queue: list[dict[str, Any]] = []          # requests of the current generation to issue
        self.waiting: set[int] = set()
        self.values: dict[int, float | None] = {}
        self.generation = 0
        self.history: list[dict[str, Any]] = []
        for _ in range(self.config.population):
            tid = self.new_trial_id()
            self.hparams[tid] = self.space.sample(self.rng)
            self.members.append(tid)
            self.reached[tid] = 0
        self._plan_generation()

    def _target(self) -> int:
        return min(self.config.max_resource, (self.generation + 1) * self.config.interval)

    def _plan_generation(self) -> None:
        target = self._target()
        self.queue = [{"trial_id": t, "resource": target, "parent": self.parent.get(t)
                       if self.reached[t] == 0 and t in self.parent else None} for t in self.members]

    def ask(self) -> TrialRequest | None:
        if not self.queue:
            return None
        item = self.queue.pop(0)
        self.waiting.add(item["trial_id"])
        return TrialRequest(item["trial_id"], self.hparams[item["trial_id"]], item["resource"], item["parent"])

    def tell(self, trial_id: int, resource: int, value: float | None) -> None:
        self.waiting.discard(trial_id)
        self.values[trial_id] = value
        self.reached[trial_id] = resource
        if self.queue or self.waiting:
            return
        if self._target() >= self.config.max_resource:
            return  # the last generation is done
        self._exploit_and_explore()
        self.generation += 1
        self._plan_generation()

    def _rank_key(self, t: int) -> tuple[float, int]:
        v = self.values.get(t)
        return (math.inf if v is None or v != v else self.score(v), t)

    def _exploit_and_explore(self) -> None:
        ranked = sorted(self.members, key=self._rank_key)
        n = max(1, int(len(ranked) * self.config.quantile))
        top, bottom = ranked[:n], ranked[-n:]
        replaced = {}
        for loser in bottom:
            if self.next_trial_id > self.config.max_trials:
                break
            source = top[self.rng.randrange(len(top))]
            child = self.new_trial_id()
            self.hparams[child] = self._explore(self.hparams[source])
            self.parent[child] = source
            self.reached[child] = 0
            replaced[loser] = child
            self.history.append({"trial_id": loser, "resource": self.reached[loser], "decision": "replaced",
                                 "by": child, "from": source})
        self.members = [replaced.get(t, t) for t in self.members]

    @classmethod
    def check_space(cls, config: SearcherConfig, space: Any) -> None:
        from mlk.errors import UserError

        unknown = sorted(set(getattr(config, "mutations", None) or []) - set(space.names()))
        if unknown:
            raise UserError(f"mutations names '{unknown[0]}', which is not a hyperparameter",
                            where="searcher.mutations", choices=space.names(), got=unknown[0])

    def _explore(self, hparams: dict[str, Any]) -> dict[str, Any]:
        out = dict(hparams)
        mutable = self.config.mutations if self.config.mutations is not None else self.space.names()
        for name, hp in self.space.params.items():
            if name not in mutable:
                continue
            if hp.type == "categorical":
                if self.rng.random() < self.config.resample_probability:
                    out[name] = hp.sample(self.rng)
            elif hp.type in ("int", "double", "log"):
                factor = self.config.factors[self.rng.randrange(len(self.config.factors))]
                low, high = (hp.base**hp.minval, hp.base**hp.maxval) if hp.type == "log" else (hp.minval, hp.maxval)
                value = min(high, max(low, out[name] * factor))
                out[name] = round(value) if hp.type == "int" else float(value)
        return out

    def is_finished(self) -> bool:
        return not self.queue and not self.waiting and self._target() >= self.config.max_resource

    def trial_info(self, trial_id: int) -> dict[str, Any]:
        return {"parent": self.parent[trial_id]} if trial_id in self.parent else {}

    def budget(self) -> int:
        return self.config.population * self.config.max_resource

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "members": self.members, "hparams": {str(k): v for k, v in self.hparams.items()},
            "parent": {str(k): v for k, v in self.parent.items()},
            "reached": {str(k): v for k, v in self.reached.items()}, "queue": self.queue,
            "waiting": sorted(self.waiting), "values": {str(k): v for k, v in self.values.items()},
            "generation": self.generation, "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.members = state["members"]
        self.hparams = {int(k): v for k, v in state["hparams"].items()}
        self.parent = {int(k): v for k, v in state["parent"].items()}
        self.reached = {int(k): v for k, v in state["reached"].items()}
        self.queue = state["queue"]
        self.waiting = set(state["waiting"])
        self.values = {int(k): v for k, v in state["values"].items()}
        self.generation = state["generation"]
        self.history = state["history"]
