"""``nevergrad``: any nevergrad optimizer (``NGOpt`` by default, ``CMA``, ``TwoPointsDE``, ``BO``,
...) through its ask/tell interface, each candidate trained to ``max_resource``.

The parametrization follows the spec: ``log`` becomes ``ng.p.Log`` (searched on the log scale),
``int`` an integer-cast ``ng.p.Scalar``, ``double`` a ``ng.p.Scalar``, ``categorical`` an
``ng.p.Choice``; ``const`` values are passed through. The optimizer's state is not serialised
directly: the searcher records its asks and tells and, on resume, replays them into a fresh
optimizer seeded the same way, which reproduces the state exactly.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from mlk.errors import UserError
from mlk.searcher import Searcher, TrialRequest
from mlk.sections import SearcherConfig


class NevergradConfig(SearcherConfig):
    optimizer: str = Field("NGOpt", description="a name from nevergrad's optimizer registry")
    max_trials: int = Field(32, ge=1, description="candidates to evaluate (the optimizer's budget)")


class NevergradSearcher(Searcher):
    """Model-based and evolutionary search from nevergrad, ask/tell with the kernel's concurrency."""

    name = "nevergrad"
    Config = NevergradConfig
    requires = ("nevergrad",)
    extra = "nevergrad"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = self.rng.randrange(2**31)
        self.log: list[list[Any]] = []            # ["ask", trial_id] and ["tell", trial_id, value]
        self.hparams: dict[int, dict[str, Any]] = {}
        self.outstanding: set[int] = set()
        self._opt: Any = None
        self._candidates: dict[int, Any] = {}

    @classmethod
    def check_space(cls, config: SearcherConfig, space: Any) -> None:
        import nevergrad as ng

        name = getattr(config, "optimizer", "NGOpt")
        if name not in ng.optimizers.registry:
            raise UserError(f"nevergrad has no optimizer '{name}'", where="searcher.optimizer",
                            choices=sorted(ng.optimizers.registry), got=name)

    # -- the optimizer ----------------------------------------------------------------------------

    def _parametrization(self) -> Any:
        import nevergrad as ng

        params = {}
        for name, hp in self.space.params.items():
            if hp.type == "log":
                params[name] = ng.p.Log(lower=hp.base**hp.minval, upper=hp.base**hp.maxval)
            elif hp.type == "int":
                params[name] = ng.p.Scalar(lower=hp.minval, upper=hp.maxval).set_integer_casting()
            elif hp.type == "double":
                params[name] = ng.p.Scalar(lower=hp.minval, upper=hp.maxval)
            elif hp.type == "categorical":
                params[name] = ng.p.Choice(hp.vals)
        instrumentation = ng.p.Instrumentation(**params)
        instrumentation.random_state.seed(self.seed)
        return instrumentation

    def _optimizer(self) -> Any:
        if self._opt is None:
            import nevergrad as ng

            cls = ng.optimizers.registry[self.config.optimizer]
            self._opt = cls(parametrization=self._parametrization(), budget=self.config.max_trials,
                            num_workers=max(1, self.concurrency))
        return self._opt

    def _to_hparams(self, candidate: Any) -> dict[str, Any]:
        values = dict(candidate.kwargs)
        out = {}
        for name, hp in self.space.params.items():
            if hp.type == "const":
                out[name] = hp.val
            elif hp.type == "int":
                out[name] = int(values[name])
            elif hp.type in ("double", "log"):
                out[name] = float(values[name])
            else:
                out[name] = values[name]
        return out

    # -- the contract -------------------------------------------------------------------------------

    def ask(self) -> TrialRequest | None:
        if len(self.hparams) >= self.config.max_trials:
            return None
        tid = self.new_trial_id()
        candidate = self._optimizer().ask()
        self._candidates[tid] = candidate
        self.hparams[tid] = self._to_hparams(candidate)
        self.outstanding.add(tid)
        self.log.append(["ask", tid])
        return TrialRequest(tid, self.hparams[tid], self.config.max_resource)

    def tell(self, trial_id: int, resource: int, value: float | None) -> None:
        self.outstanding.discard(trial_id)
        self.log.append(["tell", trial_id, value])
        if value is not None and value == value:
            self._optimizer().tell(self._candidates.pop(trial_id), self.score(value))

    def is_finished(self) -> bool:
        return len(self.hparams) >= self.config.max_trials and not self.outstanding

    def recommendation(self) -> dict[str, Any]:
        """The optimizer's own pick (may differ from the best observed trial for noisy metrics)."""
        return self._to_hparams(self._optimizer().provide_recommendation())

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seed": self.seed, "log": self.log, "concurrency": self.concurrency}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seed = state["seed"]
        self.concurrency = state["concurrency"]
        self._opt, self._candidates, self.hparams, self.outstanding = None, {}, {}, set()
        self.log = []
        replay_next = self.next_trial_id
        for entry in state["log"]:
            if entry[0] == "ask":
                self.next_trial_id = entry[1]
                self.ask()
            else:
                self.tell(entry[1], self.config.max_resource, entry[2])
        self.next_trial_id = replay_next
