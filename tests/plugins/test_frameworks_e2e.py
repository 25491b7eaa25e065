"""The shipped specs run unchanged under every framework: ``framework.name=<it>`` on digits_hb (search,
compile through stand-in compilers, validate, deploy) and cifar_hb (search with augmentation on a
small archive in CIFAR-10's format)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import mlk


def _show(workdir: Path) -> dict:
    runs = json.loads(mlk("runs", "list", "--json", cwd=workdir).stdout)
    return json.loads(mlk("runs", "show", runs[-1]["id"], "--json", cwd=workdir).stdout)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["keras", "jax"])
def test_digits_hb_runs_end_to_end(workdir: Path, framework: str) -> None:
    pytest.importorskip(framework)
    proc = mlk("run", "+spec=digits_hb", f"framework.name={framework}", "searcher.max_resource=3",
               "validate.repeats=5", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "oneDNN" not in proc.stderr  # TensorFlow's start-up noise stays out of mlk's output
    show = _show(workdir)
    assert show["summary"]["best_metrics"]["val_accuracy"] > 0.8
    nodes = {n["node_id"]: n for n in show["nodes"]}
    for done in ("export", "compile/onnx", "compile/onnxruntime", "compile/tvm", "compile/tflite",
                 "validate/onnx", "validate/tvm", "validate/tflite", "deploy/server", "deploy/mobile"):
        assert nodes[done]["status"] == "done", (done, nodes[done])
    assert nodes["compile/coreml"]["status"] == "unavailable" and "needs torch" in nodes["compile/coreml"]["error"]
    reports = {r["artifact"]: r for r in show["validation"]}
    for exact in ("compile/onnx", "compile/tvm", "compile/tflite"):
        assert reports[exact]["top1_agreement"] == 1.0 and reports[exact]["max_output_diff"] < 1e-3, exact
    listed = mlk("models", "list", cwd=workdir)
    assert "digits_hb" in listed.stdout and "digits_hb-mobile" in listed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["lightning", "keras", "jax"])
def test_cifar_hb_searches_with_augmentation(workdir: Path, framework: str) -> None:
    pytest.importorskip({"lightning": "pytorch_lightning"}.get(framework, framework))
    from tests.plugins.test_datasets import write_archive

    archive = write_archive(workdir / "cifar-10-python.tar.gz", per_batch=40)
    proc = mlk("run", "+spec=cifar_hb", f"framework.name={framework}", f"data.path={archive}",
               "searcher.max_resource=3", "hyperparameters.lr.minval=-3", "hyperparameters.lr.maxval=-1",
               "~compile", "~deploy", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    show = _show(workdir)
    assert len(show["trials"]) == 5 and {t["status"] for t in show["trials"]} <= {"completed", "stopped"}
    assert {t["hparams"]["horizontal_flip"] for t in show["trials"]} <= {True, False}
    assert show["spec"]["framework"]["name"] == framework
