"""Smoke test of the framework benchmark (benchmarks/frameworks/run.py) in its --quick sizes: torch and
lightning through mlk and through their own loops, and 1 vs 2 data-parallel workers. Structure and
positive numbers only; no wall-clock thresholds (this is not a measurement)."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest
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
        assert row["met"] == (row["ratio"] <= bench.GOAL)
        assert row["mean_ratio"] == pytest.approx(row["mlk_mean_epoch_s"] / row["idiomatic_mean_epoch_s"])
        assert row["mlk_checkpoint_s"] > 0
        for side in ("mlk", "idiomatic"):
            assert len(row["runs"][side]) == row["repeats"] == 1
            assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in row["runs"][side])
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
    # The machine slowed down during the second pair; in the other two, mlk is 2 % slower than its partner.
    mlk = [{"epoch_s": t, "mean_epoch_s": t, "checkpoint_s": 0.0} for t in (1.02, 1.5, 1.5)]
    own = [{"epoch_s": t, "mean_epoch_s": t} for t in (1.0, 1.0, 1.5 / 1.02)]
    row = bench.compare(mlk, own)
    assert row["ratio"] == pytest.approx(1.5)
    assert row["paired_ratio"] == pytest.approx(1.02)
    assert row["met"]

