"""The compile/validate stages through the kernel, with two small compilers from a throwaway
third-party distribution: ``numpy_mlp`` (torch -> a numpy MLP) and ``fp16`` (numpy MLP -> half
precision weights). Real artifacts, real runtimes, no compiler framework needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, mlk
from tests.kernel.test_registry import fake_distribution

NUMPY_MLP = '''
"""Tiny compilers for the kernel's tests."""
import json
import numpy as np
from pydantic import Field
from mlk.compiler import CompileConfig, Compiler, Unavailable


class NumpyMlp(Compiler):
    """A Linear-ReLU-Linear torch MLP as numpy arrays."""

    name = "numpy_mlp"
    accepts = ("torch",)
    produces = "numpy_mlp"

    def compile(self, source, out, inputs):
        from safetensors.numpy import load_file

        w = load_file(str(source.path / "model.safetensors"))
        np.savez(out / "mlp.npz", **{k.replace(".", "_"): v for k, v in w.items()})
        assert inputs.calibration is not None and inputs.context is not None
        return source.derive("numpy_mlp", out, "numpy_mlp", file="mlp.npz")

    def runner(self, artifact, threads):
        w = dict(np.load(artifact.file))
        w1, b1, w2, b2 = (w[k].astype(np.float32) for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"))
        return lambda x: np.maximum(x @ w1.T + b1, 0) @ w2.T + b2


class Fp16Config(CompileConfig):
    noise: float = Field(0.0, description="added to the weights, to make a gate fail")


class Fp16(Compiler):
    """Half-precision weights of a numpy MLP."""

    name = "fp16"
    Config = Fp16Config
    accepts = ("numpy_mlp",)
    produces = "numpy_fp16"

    def compile(self, source, out, inputs):
        w = dict(np.load(source.file))
        inputs.report(f"halving {len(w)} weight arrays [fp16]")
        np.savez(out / "mlp16.npz", **{k: (v + self.config.noise).astype(np.float16) for k, v in w.items()})
        return source.derive("numpy_fp16", out, "fp16", file="mlp16.npz")

    def runner(self, artifact, threads):
        return NumpyMlp(NumpyMlp.Config(name="numpy_mlp")).runner(artifact, threads)


class Gpu(Compiler):
    """Needs hardware this machine lacks."""

    name = "gpu_only"
    accepts = ("numpy_mlp",)
    produces = "gpu"

    def compile(self, source, out, inputs):
        raise Unavailable("needs an accelerator this machine does not have")
'''

SPEC = """\
defaults:
  - digits_base
  - _self_
searcher: {name: random, max_trials: 2, max_resource: 2}
"""
FAST = "validate: {repeats: 5, warmup: 1, batch_sizes: [1, 16]}\n"


@pytest.fixture
def compilers(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "compsite"
    fake_distribution(site, "mlk-tiny-compilers",
                      "[mlk.compilers]\nnumpy_mlp = tinycomp:NumpyMlp\nfp16 = tinycomp:Fp16\ngpu_only = tinycomp:Gpu\n",
                      {"tinycomp.py": NUMPY_MLP})
    return {"PYTHONPATH": f"{site}:{ROOT}"}


def _show(workdir: Path, env: dict[str, str]) -> dict:
    runs = json.loads(mlk("runs", "list", "--json", cwd=workdir, env=env).stdout)
    return json.loads(mlk("runs", "show", runs[-1]["id"], "--json", cwd=workdir, env=env).stdout)


@pytest.mark.slow
def test_compile_chain_is_planned_by_format_validated_and_reused(workdir: Path, compilers: dict) -> None:
    (workdir / "specs" / "dc.yaml").write_text(SPEC + FAST + "compile:\n  - {name: fp16}\n")
    graph = mlk("graph", "+spec=dc", cwd=workdir, env=compilers)
    assert graph.returncode == 0, graph.stderr
    assert "compile/numpy_mlp  [compile]" in graph.stdout and "(inserted: fp16 needs numpy_mlp)" in graph.stdout
    assert "validate/fp16" in graph.stdout and "validate/numpy_mlp" in graph.stdout
    proc = mlk("run", "+spec=dc", cwd=workdir, env=compilers)
    assert proc.returncode == 0, proc.stderr
    # a step's progress lines reach the person running it, under the step's id, brackets and all
    assert "compile/fp16: halving 4 weight arrays [fp16]" in proc.stderr
    show = _show(workdir, compilers)
    nodes = {n["node_id"]: n for n in show["nodes"]}
    assert all(nodes[n]["status"] == "done" for n in ("export", "compile/numpy_mlp", "compile/fp16",
                                                      "validate/numpy_mlp", "validate/fp16"))
    reports = {r["artifact"]: r for r in show["validation"]}
    exact = reports["compile/numpy_mlp"]
    assert exact["max_output_diff"] < 1e-4 and exact["accuracy_drop"] == 0.0 and exact["top1_agreement"] == 1.0
    half = reports["compile/fp16"]
    assert 0 < half["max_output_diff"] < 0.05 and half["steps"][-2:] == ["numpy_mlp", "fp16"]
    for r in reports.values():
        assert set(r["latency"]) == {"1", "16"} and r["latency"]["1"]["p50_ms"] > 0
        assert r["size_bytes"] > 0 and r["peak_rss_mb"] > 0 and r["gates"]["passed"]
    # the exported model is measured once and shared: both reports hold the very same timings
    assert exact["reference_latency"] == half["reference_latency"]
    assert exact["reference_accuracy"] == half["reference_accuracy"]
    text = mlk("runs", "show", show["id"], cwd=workdir, env=compilers).stdout
    assert "artifacts" in text and "compile/fp16" in text
    plots = mlk("runs", "plot", show["id"], "--out", str(workdir / "figs"), cwd=workdir, env=compilers)
    assert plots.returncode == 0 and (workdir / "figs" / "artifacts.png").read_bytes()[:4] == b"\x89PNG"
    # a changed compile section reuses the search and everything upstream
    (workdir / "specs" / "dc.yaml").write_text(SPEC + "compile:\n  - {name: fp16}\n  - {name: fp16, id: noisy, "
                                               "noise: 0.5, input: numpy_mlp}\nvalidate: {max_metric_drop: 0.02, "
                                               "repeats: 5, warmup: 1, batch_sizes: [1]}\n")
    again = mlk("run", "+spec=dc", cwd=workdir, env=compilers)
    assert again.returncode == 1
    assert "search: reused from run" in again.stderr and "compile/numpy_mlp: reused from run" in again.stderr
    assert "validate/noisy failed its gates: max_metric_drop: accuracy dropped" in again.stderr
    show = _show(workdir, compilers)
    nodes = {n["node_id"]: n for n in show["nodes"]}
    assert nodes["validate/noisy"]["status"] == "failed" and nodes["validate/fp16"]["status"] == "done"


@pytest.mark.slow
def test_unavailable_step_is_reported_and_skips_only_its_branch(workdir: Path, compilers: dict) -> None:
    (workdir / "specs" / "dc.yaml").write_text(SPEC + FAST + "compile:\n  - {name: gpu_only}\n  - {name: fp16}\n")
    proc = mlk("run", "+spec=dc", cwd=workdir, env=compilers)
    assert proc.returncode == 0, proc.stderr
    assert "compile/gpu_only: unavailable here: needs an accelerator" in proc.stderr
    show = _show(workdir, compilers)
    nodes = {n["node_id"]: n["status"] for n in show["nodes"]}
    assert nodes["compile/gpu_only"] == "unavailable" and nodes["validate/gpu_only"] == "skipped"
    assert nodes["validate/fp16"] == "done"


def test_no_path_to_a_format_is_a_plan_error(workdir: Path, compilers: dict) -> None:
    (workdir / "specs" / "dc.yaml").write_text(SPEC + "compile:\n  - {name: fp16, input: export}\n")
    proc = mlk("graph", "+spec=dc", cwd=workdir, env=compilers)
    assert proc.returncode == 2 and "'export' makes torch, but fp16 accepts numpy_mlp" in proc.stderr
    (workdir / "specs" / "dc.yaml").write_text(SPEC + "compile:\n  - {name: fp16}\n  - {name: fp16}\n")
    proc = mlk("graph", "+spec=dc", cwd=workdir, env=compilers)
    assert proc.returncode == 2 and "two compile steps have the id 'fp16'" in proc.stderr


@pytest.mark.slow
def test_builtin_compilers_end_to_end(workdir: Path) -> None:
    """digits_hb's compile section with a small search: every builtin runtime built and validated."""
    proc = mlk("run", "+spec=digits_hb", "searcher.max_resource=3", "validate.repeats=10",
               "compile=[{name: onnx}, {name: onnxruntime, quantize: static}, {name: tvm}, {name: tflite}, "
               "{name: coreml}, {name: tensorrt}, {name: onnxruntime, id: ort_dynamic, quantize: dynamic}]",
               "~deploy", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    show = _show(workdir, {})
    reports = {r["artifact"]: r for r in show["validation"]}
    for exact in ("compile/onnx", "compile/tvm", "compile/tflite"):
        assert reports[exact]["max_output_diff"] < 1e-4 and reports[exact]["top1_agreement"] == 1.0, exact
    for int8 in ("compile/onnxruntime", "compile/ort_dynamic"):
        assert reports[int8]["top1_agreement"] > 0.95 and reports[int8]["accuracy_drop"] <= 0.02, int8
        assert reports[int8]["size_bytes"] < reports["compile/onnx"]["size_bytes"]
    nodes = {n["node_id"]: n for n in show["nodes"]}
    assert nodes["compile/coreml"]["status"] == "done"
    assert nodes["validate/coreml"]["status"] == "unavailable" and "macOS" in nodes["validate/coreml"]["error"]
    assert nodes["compile/tensorrt"]["status"] == "unavailable"
    assert "NVIDIA GPU" in nodes["compile/tensorrt"]["error"]


def test_one_spec_compiles_any_framework_through_stand_ins(workdir: Path) -> None:
    """cifar_hb was written for torch; under jax, onnx is done by jax_onnx and torch-only steps are
    planned as unavailable with the reason, so the rest of the run goes on."""
    proc = mlk("graph", "+spec=cifar_hb", "framework.name=jax", "data.path=/nowhere/cifar.tar.gz", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    described = {line.split()[0]: lines[i + 1].strip() for i, line in enumerate(lines[:-1])
                 if line.strip().startswith(("compile/", "deploy/"))}
    assert described["compile/onnx"].startswith("jax_onnx: jax -> onnx")
    assert "stands in for onnx, which does not take jax" in described["compile/onnx"]
    assert "fold_bn: unavailable: fold_bn needs torch" in described["compile/fold_bn"]
    assert "coreml: unavailable" in described["compile/coreml"]
    onnx_line = next(line for line in lines if line.strip().startswith("compile/onnx "))
    assert onnx_line.rstrip().endswith("<- export, data")  # not behind the unavailable fold_bn
    mobile = next(line for line in lines if line.strip().startswith("deploy/mobile "))
    assert "compile/tflite" in mobile and "compile/coreml" not in mobile
    # an option the stand-in lacks is refused, naming it
    bad = mlk("graph", "+spec=digits_hb", "framework.name=keras", "compile=[{name: onnx, exporter: torchscript}]",
              "~deploy", cwd=workdir)
    assert bad.returncode == 2 and "keras_onnx makes onnx from it instead but has no option exporter" in bad.stderr
