"""The README's main job for real: digits_random trains PyTorch MLPs on scikit-learn's digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import mlk


@pytest.mark.slow
def test_digits_random_trains_selects_and_reproduces(workdir: Path) -> None:
    proc = mlk("run", "+spec=digits_random", "searcher.max_trials=4", "searcher.max_resource=4", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(mlk("runs", "list", "--json", cwd=workdir).stdout)
    run_id = runs[0]["id"]
    show = json.loads(mlk("runs", "show", run_id, "--json", cwd=workdir).stdout)
    assert len(show["trials"]) == 4 and {t["status"] for t in show["trials"]} == {"completed"}
    best = show["summary"]["best_metrics"]
    assert best["val_accuracy"] > 0.85, best  # 10 classes: chance is 0.1
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(best)
    flags = show["framework_flags"]["flags"]
    assert flags["torch.use_deterministic_algorithms"] is True and flags["torch.num_threads"] == 1
    ckpt = Path(show["summary"]["checkpoint"].removeprefix("file://"))
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "MANIFEST.json").is_file()
    rep = mlk("reproduce", run_id, cwd=workdir)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert "results identical: all 16 trial reports match bit for bit" in rep.stdout
