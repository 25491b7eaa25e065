"""Behaviour of the multi-fidelity and model-based searchers beyond the shared contract."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import pytest

from mlk.hyperparameters import SearchSpace, parse_hyperparameter
from mlk.registry import registry
from mlk.searcher import Searcher, TrialRequest

SPACE = {"lr": {"type": "log", "minval": -4, "maxval": -1}, "width": {"type": "int", "minval": 1, "maxval": 64},
         "act": {"type": "categorical", "vals": ["relu", "tanh"]}}


def make(name: str, **config: Any) -> Searcher:
    cls = registry().get("searchers", name, where="searcher.name")
    cfg = cls.Config.model_validate({"name": name, "metric": "loss", "mode": "min", **config})
    return cls(cfg, SearchSpace({k: parse_hyperparameter(v) for k, v in SPACE.items()}), 0)


def loss(req: TrialRequest) -> float:
    """Better with more resource; trials ranked by their hyperparameters (width nearest 40 wins)."""
    return abs(req.hparams["width"] - 40) / 64 + 1.0 / req.resource


def drive(s: Searcher, concurrency: int = 1, fail: set[int] = frozenset()) -> list[TrialRequest]:
    asked, flight = [], []
    while True:
        while len(flight) < concurrency:
            req = s.ask()
            if req is None:
                break
            asked.append(req)
            flight.append(req)
        if not flight:
            assert s.is_finished()
            return asked
        req = flight.pop(0)
        s.tell(req.trial_id, req.resource, None if req.trial_id in fail else loss(req))


def test_hyperband_brackets_follow_the_paper() -> None:
    s = make("hyperband", max_resource=81, eta=3)
    asked = drive(s, concurrency=4)
    starts = Counter(s.trial_bracket[r.trial_id] for r in asked if r.resource == s.brackets[
        s.trial_bracket[r.trial_id]].resources[0])
    assert [b.n for b in s.brackets] == [81, 34, 15, 8, 5]
    assert next(b.resources for b in s.brackets) == [1, 3, 9, 27, 81]
    assert [starts[i] for i in range(5)] == [81, 34, 15, 8, 5]
    # bracket s=4: 81 at 1 epoch, 27 promoted to 3, 9 to 9, 3 to 27, 1 to 81
    by_resource = Counter(r.resource for r in asked if s.trial_bracket[r.trial_id] == 0)
    assert [by_resource[r] for r in (1, 3, 9, 27, 81)] == [81, 27, 9, 3, 1]
    spent = 0
    reached: dict[int, int] = {}
    for r in asked:  # a promoted trial continues: it costs only the epochs it adds
        spent += r.resource - reached.get(r.trial_id, 0)
        reached[r.trial_id] = r.resource
    assert spent == s.budget()


def test_hyperband_promotes_the_best_of_each_rung() -> None:
    s = make("hyperband", max_resource=9, eta=3)
    asked = drive(s)
    first = [r for r in asked if s.trial_bracket[r.trial_id] == 0]
    rung0 = [r for r in first if r.resource == 1]
    promoted = {r.trial_id for r in first if r.resource == 3}
    best = sorted(rung0, key=lambda r: (loss(r), r.trial_id))[: len(rung0) // 3]
    assert promoted == {r.trial_id for r in best}
    decisions = Counter(h["decision"] for h in s.history)
    assert decisions["promoted"] and decisions["stopped"]


def test_asha_never_idles_a_worker_and_promotes_early() -> None:
    s = make("asha", max_resource=27, eta=3, max_trials=30)
    flight, asked = [], []
    for _ in range(4):
        flight.append(s.ask())
    # with results of 3 trials at rung 0, the best of them is promoted at once
    for req in flight[:3]:
        s.tell(req.trial_id, req.resource, loss(req))
    nxt = s.ask()
    best = min(flight[:3], key=loss)
    assert nxt.trial_id == best.trial_id and nxt.resource == 3
    for req in (flight[3], nxt):
        s.tell(req.trial_id, req.resource, loss(req))
    asked = drive(s, concurrency=4)
    assert all(r is not None for r in asked)
    assert len({r.trial_id for r in asked} | {r.trial_id for r in flight}) == 30
    top = [r for r in asked if r.resource == 27]
    assert top, "some trial reached max_resource"


def test_asha_replaces_failed_trials() -> None:
    s = make("asha", max_resource=9, eta=3, max_trials=10)
    asked = drive(s, fail={2, 5})
    started = {r.trial_id for r in asked}
    assert len(started) == 12  # two failures replaced
    assert sum(1 for h in s.history if h["decision"] == "failed") == 2


def test_pbt_children_start_from_parents_with_perturbed_hparams() -> None:
    s = make("pbt", max_resource=6, population=4, interval=2, quantile=0.25)
    asked = drive(s, concurrency=4)
    children = [r for r in asked if r.parent is not None]
    assert len(children) == 2  # one replacement after each of the first two generations
    for child in children:
        parent_req = next(r for r in asked if r.trial_id == child.parent)
        assert child.resource > parent_req.resource - 1
        assert 1e-4 <= child.hparams["lr"] <= 1e-1 and 1 <= child.hparams["width"] <= 64
    assert max(r.resource for r in asked) == 6
    assert {h["decision"] for h in s.history} == {"replaced"}


def test_nevergrad_keeps_log_scale_and_replays_state() -> None:
    s = make("nevergrad", max_resource=3, max_trials=12, optimizer="TwoPointsDE")
    asked = drive(s, concurrency=2)
    lrs = [r.hparams["lr"] for r in asked]
    assert all(1e-4 <= v <= 1e-1 for v in lrs)
    assert sum(1 for v in lrs if v < 1e-2) >= 3  # log-uniform puts about 2/3 below 1e-2
    assert all(isinstance(r.hparams["width"], int) for r in asked)
    half = make("nevergrad", max_resource=3, max_trials=12, optimizer="TwoPointsDE")
    flight = []
    for _ in range(6):
        flight.append(half.ask())
        half.tell(flight[-1].trial_id, 3, loss(flight[-1]))
    state = json.loads(json.dumps(half.state_dict()))
    again = make("nevergrad", max_resource=3, max_trials=12, optimizer="TwoPointsDE")
    again.load_state_dict(state)
    assert again.ask().to_dict() == half.ask().to_dict()


def test_nevergrad_unknown_optimizer_is_a_user_error() -> None:
    from mlk.errors import UserError

    with pytest.raises(UserError) as info:
        make("nevergrad", max_resource=3, optimizer="CMAA").check_space(
            make("nevergrad", max_resource=3).config.model_copy(update={"optimizer": "CMAA"}), None)
    assert "did you mean 'CMA'" in info.value.render()


def test_hyperband_budget_beats_random_bound() -> None:
    s = make("hyperband", max_resource=81, eta=3)
    assert s.budget() < math.inf and s.s_max == 4


def test_pbt_mutations_leave_architecture_hyperparameters_alone() -> None:
    s = make("pbt", max_resource=6, population=4, interval=2, mutations=["lr"])
    asked = drive(s, concurrency=2)
    by_id = {r.trial_id: r for r in asked}
    for child in (r for r in asked if r.parent is not None):
        parent = by_id[child.parent]
        assert child.hparams["width"] == parent.hparams["width"] and child.hparams["act"] == parent.hparams["act"]
    from mlk.errors import UserError

    bad = make("pbt", max_resource=6, mutations=["lr", "depth"])
    with pytest.raises(UserError, match="depth"):
        bad.check_space(bad.config, bad.space)
