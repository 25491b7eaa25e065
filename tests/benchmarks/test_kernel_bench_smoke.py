"""Smoke test of the kernel benchmark runner (benchmarks/kernel/run.py): its mlk-only parts in
--quick sizes. Structure and positive numbers only; no wall-clock thresholds (this is not a
measurement, and CI machines vary)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.kernel import run as bench


def _positive_samples(entry: dict, n: int) -> None:
    assert len(entry["runs_s"]) == n
    assert all(s > 0 for s in entry["runs_s"])
    assert entry["min_s"] <= entry["median_s"] <= entry["max_s"]


def test_cli_mlk_only() -> None:
    out = bench.bench_cli(tools=("mlk",), reps=1, warmup=0)
    assert set(out["tools"]) == {"mlk"}
    _positive_samples(out["tools"]["mlk"], 1)
    assert "ratios" not in out  # no peer was run
    assert isinstance(out["met"], bool)


def test_import() -> None:
    out = bench.bench_import(reps=1, warmup=0)
    _positive_samples(out["import_mlk"], 1)
    _positive_samples(out["bare_python"], 1)
    assert set(out["loaded"]) == {"mlk", "mlk.cli"}
    assert out["loaded"]["mlk"]["modules"] > 0
    assert isinstance(out["frameworks_imported"], list)
    assert set(out["frameworks_imported"]) <= set(bench.FRAMEWORK_MODULES)
    assert isinstance(out["met"], bool)


def test_compose() -> None:
    out = bench.bench_compose(reps=2)
    for key in ("mlk_load_spec", "hydra_compose", "mlk_compose_only", "mlk_validate_only"):
        _positive_samples(out[key], 2)
    assert out["first_call_s"] > 0
    assert out["ratio"] > 0
    assert Path(out["file"]).name == f"{bench.COMPOSE_SPEC}.yaml"


def test_mlk_trials_in_process() -> None:
    out = bench.bench_mlk_trials(trials=4, reps=1, warmup_trials=0, cli=False)
    (r,) = out["runs"]
    assert r["run_status"] == "completed"
    assert r["trials"] == 4 and r["trial_statuses"] == {"completed": 4}
    assert set(r["nodes_s"]) == {"data", "search", "select"}
    assert 0 < r["search_s"] <= r["end_to_end_s"]
    assert out["per_trial_s"] == r["search_s"] / 4 > 0
    assert "cli" not in out


def test_table_and_json(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    assert bench.main(["--quick", "--only", "import", "compose", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["quick"] is True
    assert results["machine"]["cores"] >= 1
    assert {"import", "compose"} <= set(results) and "cli" not in results and "trials" not in results
    rows = results["rows"]
    assert len(rows) == 2
    assert all(set(r) == {"measurement", "mlk", "peer", "ratio", "goal", "met"} for r in rows)
    table = bench.markdown(rows)
    assert table.splitlines()[0] == "| measurement | mlk | peer | ratio | goal | met? |"
    assert len(table.splitlines()) == 2 + len(rows)
