"""Smoke test of the framework benchmark (benchmarks/frameworks/run.py) in its --quick sizes: torch and
lightning through mlk and through their own loops, and 1 vs 2 data-parallel workers. Structure and
positive numbers only; no wall-clock thresholds (this is not a measurement)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from benchmarks.frameworks import lockstep
from benchmarks.frameworks import run as bench

MISSING = [m for m in ("torch", "pytorch_lightning", "sklearn", "safetensors") if importlib.util.find_spec(m) is None]


def test_epoch_times_are_the_median_gap_and_the_mean_to_the_finish() -> None:
    assert bench.epoch_times([10.0, 11.0, 13.0, 14.0]) == {"epoch_s": 1.0, "mean_epoch_s": 4.0 / 3}
    assert bench.epoch_times([0.0, 2.0], finished=3.0) == {"epoch_s": 2.0, "mean_epoch_s": 3.0}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fw-bench") / "results.json"
    assert bench.main(["--quick", "--no-keras-jax", "--out", str(out)]) == 0
    return dict(json.loads(out.read_text()))


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}")
def test_quick_run_measures_every_case(result: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert result["command"].startswith("python -m benchmarks.frameworks.run --quick --no-keras-jax --out ")
    assert result["machine"]["cpus"] >= 1 and result["seconds"] > 0
    assert {(r["framework"], r["model"]) for r in result["loops"]} == {
        (f, m) for f in ("torch", "lightning") for m in ("digits_mlp", "cifar_cnn")}
    for row in result["loops"]:
        assert row["mlk_epoch_s"] > 0 and row["idiomatic_epoch_s"] > 0
        assert row["ratio"] == pytest.approx(row["mlk_epoch_s"] / row["idiomatic_epoch_s"])
        assert row["met"] == (row["paired_ratio"] <= bench.GOAL)
        assert row["mean_ratio"] == pytest.approx(row["mlk_mean_epoch_s"] / row["idiomatic_mean_epoch_s"])
        assert row["mlk_checkpoint_s"] > 0
        for side in ("mlk", "idiomatic"):
            assert len(row["runs"][side]) == row["repeats"] == 1
            assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in row["runs"][side])
            assert all(len(r["epochs_s"]) == row["epochs"] for r in row["runs"][side])
    (ddp,) = result["ddp"]
    assert ddp["framework"] == "torch" and ddp["ideal"] == 2.0
    assert ddp["examples_per_s_2"] > 0 and ddp["speedup"] == pytest.approx(ddp["epoch_s_1"] / ddp["epoch_s_2"])
    text = bench.table(result)
    assert text.count("| torch |") == 3 and "| lightning | cifar_cnn |" in text


def test_table_formats_rows() -> None:
    loop = {"framework": "torch", "model": "digits_mlp", "mlk_epoch_s": 0.2, "idiomatic": "plain torch loop",
            "idiomatic_epoch_s": 0.19, "ratio": 0.2 / 0.19, "paired_ratio": 1.06, "met": False, "mean_ratio": 1.1}
    ddp = {"framework": "torch", "model": "cifar_cnn", "examples_per_s_1": 100.0, "examples_per_s_2": 180.0,
           "speedup": 1.8}
    text: str = bench.table({"loops": [loop], "ddp": [ddp]})
    assert "| torch | digits_mlp | 0.200 | plain torch loop | 0.190 | 1.053 | 1.060 | no | 1.100 |" in text
    assert "| torch | cifar_cnn | 100 | 180 | 1.80x | 2x |" in text


def test_goal_is_judged_on_the_paired_ratio() -> None:
    # The machine slowed down during the second repeat; in every pair, mlk is 2 % slower than its partner.
    def run(epochs: list[float]) -> dict[str, Any]:
        return {"epoch_s": statistics.median(epochs[1:]), "mean_epoch_s": statistics.mean(epochs[1:]),
                "checkpoint_s": 0.0, "epochs_s": epochs}

    mlk = [run([9.0, 1.02, 1.02, 1.02]), run([9.0, 1.53, 1.53, 1.53]), run([9.0, 1.53, 1.53, 1.53])]
    own = [run([5.0, 1.0, 1.0, 1.0]), run([5.0, 1.5, 1.5, 1.5]), run([5.0, 1.0, 1.0, 1.0])]
    row = bench.compare(mlk, own)
    assert row["ratio"] == pytest.approx(1.53)
    assert row["paired_ratio"] == pytest.approx(1.02)
    assert row["met"]


@pytest.mark.parametrize("mlk_first", [True, False])
def test_lockstep_alternates_epochs_and_times_each_side_alone(mlk_first: bool) -> None:
    log: list[str] = []
    threads: dict[str, str] = {}

    def loop(side: str, epochs: int, end: Callable[[], float]) -> dict[str, Any]:
        threads[side] = threading.current_thread().name
        for epoch in range(1, epochs + 1):
            log.append(f"{side}{epoch}")
            time.sleep(0.01 if side == "mlk" else 0.2)
            end()
        return {"side": side}

    mlk, own = lockstep.run_pair(lambda turn: loop("mlk", 3, lambda: turn.end_epoch("mlk")),
                                 lambda stamp: loop("own", 3, stamp), mlk_first)
    first, second = ("mlk", "own") if mlk_first else ("own", "mlk")
    assert log == [f"{side}{epoch}" for epoch in (1, 2, 3) for side in (first, second)]
    assert threads[first] == threading.main_thread().name != threads[second]
    assert mlk["side"] == "mlk" and own["side"] == "own"
    # Each side's epochs exclude the time the other side had the turn (0.2 s per own epoch).
    assert all(0.01 <= t < 0.2 for t in mlk["epochs_s"]) and all(t >= 0.2 for t in own["epochs_s"])
    assert lockstep.paired_ratio([(mlk, own)]) < 1.0


def test_lockstep_raises_a_failure_of_the_own_loop_without_hanging() -> None:
    def failing(stamp: Callable[[], float]) -> dict[str, Any]:
        stamp()
        raise ValueError("own loop broke")

    def mlk(turn: lockstep.Lockstep) -> dict[str, Any]:
        for _ in range(3):
            turn.end_epoch("mlk")
        return {}

    with pytest.raises(ValueError, match="own loop broke"):
        lockstep.run_pair(mlk, failing)
