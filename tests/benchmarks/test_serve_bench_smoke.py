"""The serve benchmark's runner at smoke sizes: three real servers (mlk batched, mlk unbatched, plain
BentoML), real closed-loop load, a results file with every variant measured and the goals judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bentoml")
pytest.importorskip("aiohttp")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_measures_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.serve.run", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    model = results["models"]["digits_mlp"]
    assert set(model["concurrency"]) == {"1", "8"}
    for c, variants in model["concurrency"].items():
        assert set(variants) == {"mlk_batched", "mlk_unbatched", "bentoml_plain"}
        for name, s in variants.items():
            assert s["ok"] > 0 and s["throughput"] > 0 and 0 < s["p50_ms"] <= s["p99_ms"], (c, name, s)
            assert s["rounds"][0]["loadavg_before"], "the shared machine's load is recorded"
    assert model["batch_sizes"]["calls"] > 0 and model["batch_sizes"]["mean"] >= 1.0
    assert model["batch_service_ms"] > 0
    kinds = {g["goal"] for g in results["goals"]}
    assert "zero errors under load" in kinds and any("plain BentoML" in k for k in kinds)
    assert "| digits_mlp | 8 | bentoml_plain |" in done.stdout
