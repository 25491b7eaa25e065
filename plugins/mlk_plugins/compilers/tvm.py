"""``tvm``: an ONNX model compiled by Apache TVM (Relax) into a shared library, ``model.so``.

``from_onnx`` imports the model (weights as constants), ``DecomposeOpsForInference`` rewrites
batch norm and friends for inference, ``tvm.compile`` lowers and builds it for ``target``, and
``export_library`` links ``model.so`` with the system C compiler. The runner loads it into a Relax
``VirtualMachine`` on the CPU.

Batch axis: with ``batch_size`` unset the ONNX model's symbolic batch axis stays symbolic in Relax
(one library for every batch size; checked with TVM 0.27: outputs equal to torch's within 1e-6).
A fixed ``batch_size`` (needed for tuning) builds for that size only; the runner then feeds larger
batches in chunks and pads the last one.

Target: ``llvm`` (this CPU's generic x86-64/aarch64 code), a TVM target as JSON
(``{"kind": "llvm", "mcpu": "native", "num-cores": 2}``), or the older command-line form
(``llvm -mcpu=native -mattr=+avx2,+fma -num-cores=2``), which TVM 0.27 no longer parses itself and
this plugin translates into the JSON form. Only CPU (``llvm``) targets that run on this machine are
supported.

Tuning (``tuning_trials > 0``) uses TVM's MetaSchedule (``tune_relax`` then ``compile_relax``; cost
model xgboost when installed, else random) and needs a fixed ``batch_size``. MetaSchedule
serialises TIR functions (``tvm.ir.save_json``) for its database and builder; that crashes the
process in the apache-tvm 0.27.0.post1 wheel, so the plugin first checks it in a subprocess and
raises :class:`~mlk.compiler.Unavailable` when it fails. Untuned (``tuning_trials: 0``) CPU code is
TVM's default schedule: correct, but neither vectorised nor parallel, so it is slow for large layers.

Threads: the runner sets ``TVM_NUM_THREADS`` (only effective before TVM's thread pool starts in the
process) and calls ``runtime.config_threadpool``, which can lower the count later. Only parallel
loops (tuned schedules) use the pool; untuned code runs on one thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from mlk.compiler import Artifact, CompileConfig, CompileInputs, Compiler, Runner, Unavailable
from mlk.errors import MlkError, UserError

FILE = "model.so"

#: Run in a subprocess: does serialising a TIR function (what MetaSchedule does) work here?
_TUNING_PROBE = """
from tvm import te, ir
from tvm.s_tir import meta_schedule
a = te.placeholder((4,), name="a")
b = te.compute((4,), lambda i: a[i] + 1.0, name="b")
assert ir.save_json(te.create_prim_func([a, b]))
"""


class TvmConfig(CompileConfig):
    """``compile:`` entry of ``name: tvm``."""

    target: str = Field("llvm", description='TVM CPU target: "llvm", JSON such as {"kind": "llvm", "mcpu": '
                                            '"native"}, or the command-line form "llvm -mcpu=native -num-cores=2"')
    batch_size: int | None = Field(None, ge=1, description="build for this batch size only (the runner splits "
                                                           "other sizes into chunks); unset: symbolic batch axis")
    tuning_trials: int = Field(0, ge=0, description="MetaSchedule tuning trials over all tasks (0: untuned); "
                                                    "needs batch_size, and a TVM whose MetaSchedule works")

    @model_validator(mode="after")
    def _tuning_needs_batch(self) -> TvmConfig:
        if self.tuning_trials > 0 and self.batch_size is None:
            raise ValueError("tuning_trials > 0 needs a fixed batch_size (MetaSchedule tunes static shapes)")
        return self


class TvmCompiler(Compiler):
    """Compile an ONNX model with Apache TVM (Relax) into a shared library for this CPU."""

    name = "tvm"
    Config: ClassVar[type[TvmConfig]] = TvmConfig
    accepts = ("onnx",)
    produces = "tvm"
    requires = ("tvm", "onnx")
    extra = "tvm"
    config: TvmConfig

    def describe(self, source_format: str) -> str:
        c = self.config
        batch = "symbolic batch" if c.batch_size is None else f"batch {c.batch_size}"
        tuned = f", {c.tuning_trials} tuning trials" if c.tuning_trials else ""
        return f"{self.name}: {source_format} -> tvm ({c.target}, {batch}{tuned})"

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        from mlk_plugins.compilers.onnx import load_onnx

        c = self.config
        spec = parse_target(c.target)
        if c.tuning_trials:
            _check_tuning()
        model = load_onnx(source.file)
        feed = model.graph.input[0]
        dims = feed.type.tensor_type.shape.dim
        onnx_batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
        batch = c.batch_size or onnx_batch
        if onnx_batch is not None and batch != onnx_batch:
            raise UserError(f"the ONNX model has a fixed batch of {onnx_batch}; batch_size {batch} cannot be "
                            "built from it", where="compile.batch_size",
                            hint="export ONNX with dynamic_batch: true, or leave batch_size unset")

        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        target = _target(tvm, spec)
        shape_dict = None
        if batch is not None:
            shape_dict = {feed.name: [batch, *(int(d.dim_value) for d in dims[1:])]}
        try:
            mod = from_onnx(model, shape_dict=shape_dict, dtype_dict={feed.name: "float32"},
                            keep_params_in_input=False)
        except Exception as e:  # the frontend raises bare errors for unsupported operators
            raise MlkError(f"TVM cannot import {source.file}: {type(e).__name__}: {e}") from e
        mod = relax.transform.DecomposeOpsForInference()(mod)
        if c.tuning_trials:
            executable = _tune_and_compile(mod, spec, c.tuning_trials, inputs)
        else:
            executable = tvm.compile(mod, target=target)
        try:
            executable.export_library(str(out / FILE))
        except Exception as e:  # linking needs a C compiler (TVM calls gcc / $CC)
            raise Unavailable(f"TVM could not link {FILE}; it needs a working C compiler (gcc or $CC): {e}") from e
        step = f"tvm {target.kind.name}" + (f" batch {batch}" if batch else "") + \
            (f", tuned {c.tuning_trials} trials" if c.tuning_trials else "")
        artifact = source.derive("tvm", out, step, file=FILE, target=spec,
                                 batch_size=batch, tuning_trials=c.tuning_trials, tvm_version=tvm.__version__)
        artifact.save_meta()
        return artifact

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        from mlk_plugins.compilers.onnx import run_in_chunks

        path = artifact.file
        if not path.is_file():
            raise MlkError(f"TVM library {path} does not exist")
        os.environ.setdefault("TVM_NUM_THREADS", str(max(1, threads)))
        import numpy as np
        import tvm
        from tvm import relax

        tvm.get_global_func("runtime.config_threadpool")(0, max(1, threads))
        try:
            library = tvm.runtime.load_module(str(path))
        except Exception as e:  # a truncated or foreign .so
            raise MlkError(f"cannot load TVM library {path}: {type(e).__name__}: {e}") from e
        device = tvm.cpu()
        vm = relax.VirtualMachine(library, device)
        main = vm["main"]
        fixed = artifact.meta.get("batch_size")

        def run_once(x: Any) -> Any:
            return main(tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), device)).numpy()

        return lambda x: run_in_chunks(run_once, x, fixed)


def parse_target(text: str) -> dict[str, Any]:
    """``text`` (a kind, JSON, or ``llvm -key=value ...``) as a TVM target dict; CPU (llvm) targets only."""
    text = text.strip()
    if not text:
        raise UserError("target is empty", where="compile.target", hint='use "llvm" for this CPU')
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"target is not valid JSON: {e}", where="compile.target", got=text) from e
        if not isinstance(spec, dict):
            raise UserError("target JSON must be an object", where="compile.target", got=text)
    else:
        kind, *options = text.split()
        spec = {"kind": kind}
        for option in options:
            key, eq, value = option.lstrip("-").partition("=")
            if not eq or not key:
                raise UserError(f"target option '{option}' is not -key=value", where="compile.target", got=text)
            if key == "mattr":
                spec[key] = [v for v in value.split(",") if v]
            elif key == "num-cores":
                spec[key] = int(value) if value.isdigit() else value
            else:
                spec[key] = value
    kind = spec.get("kind")
    if kind != "llvm":
        raise Unavailable(f"the tvm compiler builds for the CPU (target kind 'llvm') only, not {kind!r}: its "
                          "runner executes on this machine's CPU")
    return spec


def _target(tvm: Any, spec: dict[str, Any]) -> Any:
    try:
        return tvm.target.Target(spec)
    except Exception as e:  # unknown option names
        raise UserError(f"TVM rejects the target {json.dumps(spec)}: {e}", where="compile.target") from e


def _check_tuning() -> None:
    probe = subprocess.run([sys.executable, "-c", _TUNING_PROBE], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        import tvm

        raise Unavailable(
            f"MetaSchedule tuning does not work with the installed TVM {tvm.__version__}: importing "
            f"tvm.s_tir.meta_schedule or serialising a TIR function (tvm.ir.save_json), which its database "
            f"and builder need, fails ({_why(probe)}); use tuning_trials: 0 or another TVM build")


def _why(probe: subprocess.CompletedProcess[str]) -> str:
    if probe.returncode < 0:
        try:
            return f"the process died of {signal.Signals(-probe.returncode).name}"
        except ValueError:
            return f"the process died of signal {-probe.returncode}"
    lines = [line.strip() for line in probe.stderr.splitlines() if line.strip()]
    return f"exit code {probe.returncode}" + (f": {lines[-1]}" if lines else "")


def _tune_and_compile(mod: Any, spec: dict[str, Any], trials: int, inputs: CompileInputs) -> Any:
    """MetaSchedule: tune ``mod``'s fused TIR functions with ``trials`` measured candidates in all, then
    build with the best schedules found (untuned functions get DLight's defaults)."""
    import importlib.util

    import tvm
    from tvm.s_tir import meta_schedule as ms

    # MetaSchedule needs the core count in an llvm target; its default cost model needs xgboost.
    target = tvm.target.Target({"num-cores": max(1, inputs.threads), **spec})
    cost_model = "xgb" if importlib.util.find_spec("xgboost") is not None else "random"
    with tempfile.TemporaryDirectory(prefix="mlk-tvm-tune-") as work:
        database = ms.relax_integration.tune_relax(
            mod, {}, target, work, max_trials_global=trials, num_trials_per_iter=min(64, trials),
            cost_model=cost_model, seed=inputs.seed)
        return ms.relax_integration.compile_relax(database, mod, target, None)
