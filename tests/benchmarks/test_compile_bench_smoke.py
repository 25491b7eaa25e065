"""Smoke test of the compile benchmark (benchmarks/compile/run.py) in its --quick sizes: the digits MLP
through every variant. Structure and positive numbers only; no wall-clock thresholds (this is not a
measurement, and CI machines vary)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from benchmarks.compile import run as bench
from benchmarks.compile import timing
from benchmarks.compile import variants as vr

MISSING = [m for m in ("torch", "onnx", "onnxscript", "onnxruntime", "tvm", "sklearn", "safetensors")
           if importlib.util.find_spec(m) is None]
# about 30 s: it trains the MLP briefly and builds all eight variants
#: the variants built without tuning (the smoke run skips MetaSchedule: it takes minutes)
UNTUNED = [k for k in vr.DEFAULT if k not in vr.TUNED]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}")]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # tuning_trials=0: the tuning probe (a subprocess that imports TVM) is left to the real run
    return bench.bench_model("digits_mlp", tmp_path_factory.mktemp("compile-bench"), quick=True, tuning_trials=0)


def test_training_and_variants(result: dict[str, Any]) -> None:
    assert result["model"] == "digits_mlp"
    assert result["training"]["steps"] > 0 and result["training"]["seconds"] > 0
    assert 0.0 <= result["training"]["test"]["accuracy"] <= 1.0
    assert result["errors"] == {}
    assert set(result["variants"]) == set(UNTUNED)
    for key, v in result["variants"].items():
        assert v["size_bytes"] > 0, key
        assert v["compile_s"] >= 0, key
        assert v["steps"][0] == "benchmark source", key
    assert result["variants"]["ort_int8_static_pc"]["per_channel"] is True
    assert result["variants"]["ort_int8_static_pt"]["per_channel"] is False
    assert result["variants"]["prune"]["passes"][0]["method"] == "channel"
    assert result["variants"]["fold_bn"]["passes"][0]["pairs_folded"] == 0  # the MLP has no batch norm


def test_accuracy(result: dict[str, Any]) -> None:
    acc = result["accuracy"]["variants"]
    assert set(acc) == set(UNTUNED)
    assert acc["eager"]["agreement_with_eager"] == 1.0 and acc["eager"]["max_abs_logit_diff"] == 0.0
    for key, a in acc.items():
        assert 0.0 <= a["accuracy"] <= 1.0 and 0.0 <= a["agreement_with_eager"] <= 1.0, key
        assert a["examples"] == result["data"]["sizes"]["test"]
    # fp32 compilers compute what eager computes
    for key in ("ort_fp32", "tvm", "fold_bn"):
        assert acc[key]["max_abs_logit_diff"] < 1e-3, key


def test_latency(result: dict[str, Any]) -> None:
    assert set(result["latency"]) == {str(b) for b in bench.BATCHES}
    for block in result["latency"].values():
        assert len(block["loadavg_before"]) == 3 and len(block["loadavg_after"]) == 3
        assert block["seconds"] > 0
        for key, s in block["variants"].items():
            assert s["n"] == len(s["samples_ms"]) >= 5, key
            assert all(v > 0 for v in s["samples_ms"]), key
            assert 0 < s["min_ms"] <= s["p50_ms"] <= s["p99_ms"] <= s["max_ms"], key


def test_rows_and_goals(result: dict[str, Any]) -> None:
    for batch in bench.BATCHES:
        table = result["rows"][str(batch)]
        assert [r["variant"] for r in table] == UNTUNED
        assert table[0]["vs_eager"] == 1.0
        assert all(r["vs_eager"] > 0 and r["vs_ort_fp32"] > 0 for r in table)
    goals = result["goals"]
    assert len(goals) == 3 * len(bench.BATCHES)
    for g in goals:
        assert g["value"] > 0
        assert g["met"] is None if g["limit"] is None else isinstance(g["met"], bool)
    assert {g["variant"] for g in goals if "variant" in g} <= {*bench.INT8, "tvm"}
    assert all(g["note"].startswith("default schedules: tuning not tried") for g in goals if g.get("variant") == "tvm")


def test_table_and_json(result: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "bench_model", lambda key, work, **kw: dict(result))
    output = tmp_path / "results.json"
    assert bench.main(["--quick", "--output", str(output)]) == 0
    saved = json.loads(output.read_text())
    assert saved["quick"] is True and set(saved["models"]) == {"digits_mlp"}
    assert saved["machine"]["cores"] >= 1 and saved["seconds"] > 0
    table = capsys.readouterr().out
    assert "### digits_mlp, batch 1" in table and "### digits_mlp, batch 32" in table and "### Goals" in table
    assert table.count("| torch eager |") == len(bench.BATCHES)


def test_merge_keeps_other_models_and_variants_reach_bench_model(result: dict[str, Any], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, tuple[str, ...]]] = []

    def fake(key: str, work: Path, **kw: Any) -> dict[str, Any]:
        calls.append((key, kw["only"]))
        return dict(result)

    monkeypatch.setattr(bench, "bench_model", fake)
    output = tmp_path / "results.json"
    earlier = {"cifar_cnn": {**result, "model": "cifar_cnn"}, "digits_mlp": {**result, "model": "old digits"}}
    output.write_text(json.dumps({"date": "earlier", "command": "earlier run", "models": earlier}))
    assert bench.main(["--quick", "--output", str(output), "--merge", "--variants", "ort_fp32", "tvm"]) == 0
    assert calls == [("digits_mlp", ("eager", "ort_fp32", "tvm"))]
    saved = json.loads(output.read_text())["models"]
    assert saved["cifar_cnn"] == {**earlier["cifar_cnn"], "date": "earlier", "command": "earlier run"}
    assert saved["digits_mlp"]["model"] == "digits_mlp" and saved["digits_mlp"]["date"] != "earlier"


def test_percentile() -> None:
    assert timing.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert timing.percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    calls = []
    out = timing.measure({"a": calls.append, "b": calls.append}, 0, repeats=7, warmup=2, rounds=3, budget_s=1.0,
                         min_repeats=1, settle_s=0.0)
    assert out["variants"]["a"]["n"] == out["variants"]["b"]["n"] == 7
