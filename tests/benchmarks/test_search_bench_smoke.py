"""Smoke test of the search benchmarks (benchmarks/search): the replay harness on a tiny synthetic
table, its epoch accounting, the multi-fidelity Hartmann-6, the batched training of the curve
table against plain torch, and the structure of the runner's results. No wall-clock thresholds."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from benchmarks.search import replay as rp
from benchmarks.search.hartmann import F_STAR, X_STAR, MultiFidelityHartmann, h6

R = 9


def synthetic_table(n: int = 60, epochs: int = R, seed: int = 0) -> dict[str, np.ndarray]:
    """Configurations from the digits space with made-up curves that improve with epochs."""
    space = rp.digits_space()
    rng = random.Random(seed)
    configs = [space.sample(rng) for _ in range(n)]
    table = {k: np.array([c[k] for c in configs]) for k in ("lr", "hidden", "dropout", "batch_size")}
    quality = np.array([(math.log10(c["lr"]) + 2.5) ** 2 + c["dropout"] for c in configs])
    e = np.arange(1, epochs + 1)
    noise = np.random.default_rng(seed).random((n, epochs)) * 0.01
    table["val_loss"] = (0.5 * quality[:, None] + 1.0 / e[None, :] + noise).astype(np.float32)
    table["val_accuracy"] = np.exp(-table["val_loss"]).astype(np.float32)
    return table


@pytest.fixture(scope="module")
def table() -> rp.CurveTable:
    return rp.CurveTable(synthetic_table(), rp.digits_space())


class Scripted(rp.Method):
    """Runs a fixed list of jobs, one after the other."""

    label = "scripted"

    def __init__(self, jobs: list[rp.Job]) -> None:
        self.jobs = list(jobs)
        self.ended: list[tuple[Any, int]] = []

    def next_job(self) -> rp.Job | None:
        return self.jobs.pop(0) if self.jobs else None

    def on_job_end(self, job: rp.Job, epoch: int, value: float) -> None:
        self.ended.append((job.key, epoch))

    def finished(self) -> bool:
        return not self.jobs


def test_nearest_row_lookup(table: rp.CurveTable) -> None:
    raw = synthetic_table()
    for i in (0, 7, 33):
        hp = {k: raw[k][i].item() for k in ("lr", "hidden", "dropout", "batch_size")}
        assert table.locate(hp) == i  # a table configuration maps to its own row
    assert table.optimum == pytest.approx(float(raw["val_loss"].min()))
    assert table.value(5, 3) == pytest.approx(float(raw["val_loss"][5, 2]))


def test_continued_trial_costs_only_the_added_epochs(table: rp.CurveTable) -> None:
    # trial on row 4: 1 epoch, then continued from its checkpoint to 3 epochs -> 3 epochs in all, not 4
    method = Scripted([rp.Job("a", 4, 0, 1), rp.Job("a", 4, 1, 3)])
    trace = rp.simulate(table, method, budget=100, seed=0, workers=1)
    assert trace.total_epochs == 3
    assert method.ended == [(4, 1), (4, 3)]
    assert trace.finished and not trace.stalled


def test_asha_promotions_are_charged_incrementally(table: rp.CurveTable) -> None:
    # ASHA, R=3, eta=3, 3 trials: three at 1 epoch, the best promoted to 3: 3 + (3 - 1) = 5 epochs
    method = rp.MlkMethod(rp.CurveTable(synthetic_table(epochs=3), rp.digits_space()), "asha",
                          {"eta": 3, "min_resource": 1, "max_trials": 3}, seed=0, workers=1)
    trace = rp.simulate(method.problem, method, budget=1000, seed=0, workers=1)
    asks = [e for e in method.log if e[0] == "ask"]
    assert [(r, s) for _, _, r, s in asks] == [(1, 0), (1, 0), (1, 0), (3, 1)]
    assert trace.total_epochs == 5
    assert trace.finished


@pytest.mark.parametrize("kind", ["mlk-random", "mlk-hyperband", "mlk-asha"])
def test_mlk_searchers_replay(table: rp.CurveTable, kind: str) -> None:
    budget = 400
    trace = rp.run_one(table, kind, seed=1, budget=budget)
    assert 0 < trace.total_epochs <= budget
    assert not trace.stalled
    assert trace.best == sorted(trace.best, reverse=True)  # best-so-far only improves
    assert trace.epochs == sorted(trace.epochs)
    assert trace.final() >= table.optimum
    assert trace.best_at(0) == math.inf
    assert trace.best_at(budget) == trace.final()
    assert trace.configurations > 0


@pytest.mark.parametrize("kind", ["optuna-random", "ray-asha", "ray-hyperband"])
def test_peers_replay(table: rp.CurveTable, kind: str) -> None:
    trace = rp.run_one(table, kind, seed=0, budget=150)
    assert trace.total_epochs == 150
    assert trace.final() < math.inf and not trace.stalled


def test_same_seed_same_trace(table: rp.CurveTable) -> None:
    a = rp.run_one(table, "mlk-asha", seed=3, budget=200).to_dict()
    b = rp.run_one(table, "mlk-asha", seed=3, budget=200).to_dict()
    assert a == b


def test_conformance_checks_pass_on_a_small_table(table: rp.CurveTable) -> None:
    hb = rp.check_hyperband(table, seed=0)
    assert hb["problems"] == []
    assert hb["epochs"] == hb["expected_epochs"] == rp.hyperband_epochs(R, 3)
    asha = rp.check_asha(table, seed=0, budget=300)
    assert asha["problem_count"] == 0 and asha["promotions"] > 0


def test_summary_and_quantiles(table: rp.CurveTable) -> None:
    traces = {k: [rp.run_one(table, k, s, 300) for s in range(3)] for k in ("mlk-random", "mlk-asha")}
    out = rp.summarize(traces, table.optimum, (100, 300), "mlk-random", 300)
    assert set(out["methods"]) == {"mlk-random", "mlk-asha"}
    for entry in out["methods"].values():
        assert set(entry["regret"]) == {"100", "300"}
        assert entry["regret"]["300"]["median"] >= 0
        assert entry["seeds"] == 3
    q = rp.quantiles([1.0, 2.0, math.inf])
    assert q["median"] == 2.0 and q["q75"] == math.inf


def test_hartmann_optimum_and_fidelity() -> None:
    assert h6(X_STAR) == pytest.approx(-3.32237, abs=1e-4)
    assert F_STAR == pytest.approx(-3.32237)
    assert float(h6(np.zeros(6))) > -1.0
    for variant in ("good", "poor"):
        f = MultiFidelityHartmann(variant, max_resource=81)
        assert f(X_STAR, 81) == pytest.approx(h6(X_STAR))  # full fidelity is the true function
        assert f(X_STAR, 1) == f(X_STAR, 1)  # deterministic
        assert f(X_STAR, 1) > f(X_STAR, 81)  # low fidelity looks worse at the optimum
    poor = MultiFidelityHartmann("poor")
    mirrored = 1.0 - X_STAR  # the low-fidelity optimum region is poor at full fidelity
    assert poor(mirrored, 1) < poor(X_STAR, 1)
    assert poor(mirrored, 81) > -1.0


def test_batched_training_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    from benchmarks.search.curves import Chunk

    from mlk_plugins.models._torch_nets import MLP

    configs = [{"lr": 0.01, "hidden": 5, "dropout": 0.0, "batch_size": 4},
               {"lr": 0.003, "hidden": 8, "dropout": 0.0, "batch_size": 4}]
    chunk = Chunk(configs, [1, 2], n_in=6, n_out=3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, 6, generator=g)
    y = torch.randint(0, 3, (3, 4), generator=g)
    for i, cfg in enumerate(configs):
        h = cfg["hidden"]
        model = MLP(6, h, 3, 0.0)
        with torch.no_grad():
            model.fc1.weight.copy_(chunk.w1[i, :, :h].t())
            model.fc1.bias.copy_(chunk.b1[i, 0, :h])
            model.fc2.weight.copy_(chunk.w2[i, :h, :].t())
            model.fc2.bias.copy_(chunk.b2[i, 0, :])
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        for step in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[step]), y[step]).backward()
            opt.step()
        configs[i]["model"] = model
    with torch.no_grad():
        for step in range(3):
            xb = x[step].expand(2, 4, 6).contiguous()
            chunk.train_step(xb, y[step].expand(2, 4).contiguous(), torch.Generator())
    for i, cfg in enumerate(configs):
        h, model = cfg["hidden"], cfg["model"]
        assert torch.allclose(chunk.w1[i, :, :h].t(), model.fc1.weight, atol=1e-6)
        assert torch.allclose(chunk.w2[i, :h, :].t(), model.fc2.weight, atol=1e-6)
        assert torch.allclose(chunk.b2[i, 0], model.fc2.bias, atol=1e-6)
        assert float(chunk.w1[i, :, h:].abs().sum()) == 0.0  # padded units never move


def test_runner_results_structure(tmp_path: Path) -> None:
    from benchmarks.search import run as bench

    table_path = tmp_path / "t.npz"
    np.savez_compressed(table_path, **synthetic_table())
    output = tmp_path / "results.json"
    assert bench.main(["--quick", "--seeds", "1", "--processes", "1", "--only", "digits", "digits_error", "conformance",
                       "--methods", "mlk-random", "mlk-hyperband", "mlk-asha",
                       "--table", str(table_path), "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert set(results) >= {"command", "date", "machine", "digits", "conformance", "seconds"}
    d = results["digits"]
    assert set(d["summary"]["methods"]) == {"mlk-random", "mlk-hyperband", "mlk-asha"}
    assert set(d["goals"]) >= {"speedup", "anytime", "speedup_met", "anytime_met"}
    e = results["digits_error"]
    assert e["problem"]["metric"] == "val_error" and d["problem"]["metric"] == "val_loss"
    assert set(e["summary_told"]["methods"]) == {"mlk-random", "mlk-hyperband", "mlk-asha"}
    assert results["conformance"]["hyperband_ok"] and results["conformance"]["asha_ok"]
