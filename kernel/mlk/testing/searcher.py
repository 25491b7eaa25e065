"""Conformance suite of searchers (``mlk.searchers``)."""

from __future__ import annotations

import json
import math
import random
from typing import Any, ClassVar

import pytest

from mlk.hyperparameters import SearchSpace, parse_hyperparameter
from mlk.registry import registry
from mlk.searcher import Searcher, TrialRequest
from mlk.sections import SearcherConfig

SPACE = {
    "lr": {"type": "log", "minval": -4, "maxval": -1, "count": 2},
    "width": {"type": "int", "minval": 1, "maxval": 8, "count": 2},
    "drop": {"type": "double", "minval": 0.0, "maxval": 0.5, "count": 2},
    "act": {"type": "categorical", "vals": ["relu", "tanh"]},
}


def objective(hparams: dict[str, Any], resource: int) -> float:
    """A smooth function of the hyperparameters that improves with resource."""
    lr = math.log10(hparams["lr"])
    return (lr + 2.5) ** 2 + (hparams["width"] - 5) ** 2 / 10 + hparams["drop"] + 1.0 / resource


class SearcherContract:
    """Subclass and set ``plugin``; override ``config`` to pass plugin-specific options."""

    plugin: ClassVar[str] = ""
    config: ClassVar[dict[str, Any]] = {}
    max_trials: ClassVar[int] = 16
    max_resource: ClassVar[int] = 9

    def make(self, seed: int = 0) -> Searcher:
        cls = registry().get("searchers", self.plugin, where="searcher.name")
        cfg = cls.Config.model_validate({"name": self.plugin, "metric": "loss", "mode": "min",
                                         "max_trials": self.max_trials, "max_resource": self.max_resource,
                                         **self.config})
        space = SearchSpace({k: parse_hyperparameter(v) for k, v in SPACE.items()})
        cls.check_space(cfg, space)
        return cls(cfg, space, seed)

    def drive(self, searcher: Searcher, fail: frozenset[int] | set[int] = frozenset(), steps: int | None = None,
              concurrency: int = 3) -> list[TrialRequest]:
        """Run the ask/tell loop with up to ``concurrency`` requests in flight, results in random order."""
        asked: list[TrialRequest] = []
        flight: list[TrialRequest] = []
        order = random.Random(1)
        for _ in range(steps if steps is not None else 100_000):
            while len(flight) < concurrency:
                req = searcher.ask()
                if req is None:
                    break
                asked.append(req)
                flight.append(req)
            if not flight:
                assert searcher.is_finished(), "nothing in flight, nothing to ask, but not finished"
                return asked
            req = flight.pop(order.randrange(len(flight)))
            value = None if req.trial_id in fail else objective(req.hparams, req.resource)
            searcher.tell(req.trial_id, req.resource, value)
        if steps is None:
            raise AssertionError("the search did not finish within 100000 steps")
        for req in flight:
            searcher.tell(req.trial_id, req.resource, objective(req.hparams, req.resource))
        return asked

    def test_registered_class(self) -> None:
        cls = registry().get("searchers", self.plugin, where="searcher.name")
        assert issubclass(cls, Searcher)
        assert cls.name == self.plugin
        assert issubclass(cls.Config, SearcherConfig)
        assert cls.__doc__, "a searcher documents itself"

    def test_unknown_option_is_rejected(self) -> None:
        cls = registry().get("searchers", self.plugin, where="searcher.name")
        with pytest.raises(ValueError):
            cls.Config.model_validate({"name": self.plugin, "metric": "loss", "no_such_option": 1})

    def test_requests_are_valid_and_search_finishes(self) -> None:
        searcher = self.make()
        asked = self.drive(searcher)
        assert asked, "the searcher asked for nothing"
        assert searcher.is_finished()
        seen: dict[int, TrialRequest] = {}
        for req in asked:
            assert 1 <= req.resource <= self.max_resource
            assert set(req.hparams) == set(SPACE)
            assert 1e-4 - 1e-12 <= req.hparams["lr"] <= 1e-1 + 1e-12
            assert 1 <= req.hparams["width"] <= 8 and isinstance(req.hparams["width"], int)
            assert req.hparams["act"] in ("relu", "tanh")
            if req.trial_id in seen:  # a continued trial keeps its hyperparameters and grows
                assert req.hparams == seen[req.trial_id].hparams
                assert req.resource > seen[req.trial_id].resource
            seen[req.trial_id] = req
        assert len(seen) <= self.max_trials

    def test_same_seed_same_requests(self) -> None:
        a = [r.to_dict() for r in self.drive(self.make(seed=3), concurrency=1)]
        b = [r.to_dict() for r in self.drive(self.make(seed=3), concurrency=1)]
        assert a == b

    def test_state_round_trip_resumes_identically(self) -> None:
        whole = self.drive(self.make(seed=5), concurrency=1)
        first = self.make(seed=5)
        part = self.drive(first, steps=max(1, len(whole) // 2), concurrency=1)
        state = json.loads(json.dumps(first.state_dict()))
        second = self.make(seed=99)  # a different seed: everything must come from the state
        second.load_state_dict(state)
        rest = self.drive(second, concurrency=1)
        assert [r.to_dict() for r in part + rest] == [r.to_dict() for r in whole]

    def test_failed_trials_do_not_stall_the_search(self) -> None:
        searcher = self.make()
        self.drive(searcher, fail={1, 2, 3})
        assert searcher.is_finished()
