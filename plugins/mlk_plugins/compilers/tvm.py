"""``tvm``: an ONNX model compiled by Apache TVM (Relax) into a shared library, ``model.so``.

``from_onnx`` imports the model (weights as constants), ``DecomposeOpsForInference`` rewrites
batch norm and friends for inference, and the Relax CPU pipeline (``relax.get_default_pipeline``:
legalisation, constant folding, operator fusion) lowers it; ``export_library`` links ``model.so``
with the system C compiler. The runner loads it into a Relax ``VirtualMachine`` on the CPU and passes
arrays in and out through DLPack (no copies unless the input is misaligned).

Batch axis: with ``batch_size`` unset the ONNX model's symbolic batch axis stays symbolic in Relax
(one library for every batch size). A fixed ``batch_size`` (needed for tuning) builds for that size
only; the runner then feeds other batch sizes in chunks and pads the last one.

Target: ``llvm`` (generic x86-64/aarch64 code), a TVM target as JSON (``{"kind": "llvm", "mcpu":
"native"}``), or the command-line form (``llvm -mcpu=native -num-cores=2``), which TVM 0.27 no
longer parses itself and this plugin translates. ``mcpu: native`` is replaced by this machine's CPU
name (``znver3``, ``skylake``...): the LLVM inside the apache-tvm wheel rejects ``native`` for its
triple and silently falls back to generic code. Only CPU (``llvm``) targets are supported.

Schedules. Untuned (``tuning_trials: 0``), every fused operator keeps TVM's default schedule: plain
loops, correct but neither tiled, vectorised nor parallel, so convolutions are slow. With
``tuning_trials > 0`` (and a fixed ``batch_size``) MetaSchedule searches schedules (tiling,
vectorisation, parallel loops, unrolling) for each fused operator, measuring ``tuning_trials``
candidates in all, within ``tuning_budget_s`` seconds. Tuning goes in rounds of one batch of
candidates per operator, each round starting from the best schedules measured so far; no round
starts after the budget, and candidates of a running round that reach the builder after it are not
built. The best schedule found for each operator is built in (operators never measured keep the
default); the artifact's ``tuning`` facts say how many trials were measured, for how many operators, and
which operators were built with their tuned schedule (``tasks_applied``). MetaSchedule's cost model is
XGBoost when ``xgboost`` is installed (the ``tvm`` extra installs ``xgboost-cpu``), else random scores.
Tuning runs in a child process, which builds and times candidates itself (MetaSchedule's own
builder and runner start pools of worker processes that each import TVM and torch: 16 candidates of
the digits MLP took 9 minutes that way on a loaded machine, 32 in-process 48 s) and imports only
the x86 and ARM tensor intrinsics (importing all of them, CUDA and ROCm included, took two minutes on a
loaded machine). The artifact records what was done:
``schedule`` is ``default`` or ``metaschedule``, with the trials measured, tasks and seconds.

MetaSchedule needs TVM's object serialisation (``tvm.ir.save_json``; ``TuneContext`` uses it to
copy modules). With apache-tvm 0.27.0.post1 and apache-tvm-ffi 0.1.15 that crashes (SIGSEGV in
``tvm::ffi::ToJSONGraph`` on any object with a data-type field; apache-tvm only asks for
``apache-tvm-ffi>=0.1.14.post0``); with apache-tvm-ffi 0.1.14.post1 it works. The plugin checks it
in a subprocess and raises :class:`~mlk.compiler.Unavailable` naming the versions when it fails.

Threads: the runner sets ``TVM_NUM_THREADS`` (only effective before TVM's thread pool starts in the
process) and calls ``runtime.config_threadpool``. Only parallel loops (tuned schedules) use the pool;
default schedules run on the calling thread.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from mlk.compiler import Artifact, CompileConfig, CompileInputs, Compiler, Runner, Unavailable
from mlk.errors import MlkError, UserError

FILE = "model.so"
TUNING_FILE = "tuning.json"
#: TVM data are 64-byte aligned; inputs that are not get copied into an aligned buffer.
ALIGNMENT = 64
#: input shapes whose staging arrays a runner keeps per thread (a symbolic batch sees one per batch size)
MAX_STAGING_SHAPES = 64
#: tuning candidates per operator in the first round; each round doubles it, up to the maximum
FIRST_TRIALS_PER_ROUND = 8
MAX_TRIALS_PER_ROUND = 64
#: the share of a round that the search may take (it costs the same per operator whatever it proposes);
#: a round is made larger than twice the last until its candidates take the rest
SEARCH_SHARE = 1 / 3
#: the tuning child's stdout lines that carry progress for people start with this
PROGRESS = "mlk-progress: "
#: seconds between the tuning child's progress lines within a round
PROGRESS_EVERY_S = 60.0

#: Run in a subprocess: does serialising a TIR object with a data-type field (what MetaSchedule's
#: TuneContext does) work here? It crashes with apache-tvm 0.27.0.post1 + apache-tvm-ffi 0.1.15.
_TUNING_PROBE = """
from tvm import te, ir
a = te.placeholder((4,), name="a")
b = te.compute((4,), lambda i: a[i] + 1.0, name="b")
assert ir.save_json(te.create_prim_func([a, b]))
"""


class TvmConfig(CompileConfig):
    """``compile:`` entry of ``name: tvm``."""

    target: str = Field("llvm", description='TVM CPU target: "llvm", JSON such as {"kind": "llvm", "mcpu": '
                                            '"native"}, or the command-line form "llvm -mcpu=native -num-cores=2" '
                                            '(native: this machine\'s CPU)')
    batch_size: int | None = Field(None, ge=1, description="build for this batch size only (the runner splits "
                                                           "other sizes into chunks); unset: symbolic batch axis")
    tuning_trials: int = Field(0, ge=0, description="MetaSchedule tuning: candidate schedules measured over all "
                                                    "fused operators (0: TVM's default schedules); needs batch_size")
    tuning_budget_s: float = Field(1800.0, gt=0, description="wall-clock limit of tuning in seconds; candidates "
                                                             "past it are not measured")
    weight_prepack: bool = Field(False, description="tuned builds: let each operator's schedule choose the "
                                                    "layout its weights are stored in (MetaSchedule's layout "
                                                    "rewrite; the weights are repacked once, at build time)")

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
        tuned = f", tuned: {c.tuning_trials} trials within {c.tuning_budget_s:g} s" if c.tuning_trials else \
            ", default schedules"
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

        resolved = resolve_target(tvm, spec)
        target = _target(tvm, resolved)
        shape = None if batch is None else [batch, *(int(d.dim_value) for d in dims[1:])]
        if c.tuning_trials:
            facts = _tune_in_child(source.file, out, resolved, shape, c, inputs)
            schedule = "metaschedule"
        else:
            mod = import_onnx(model, shape)
            executable = build_default(mod, target)
            _export(executable, out / FILE)
            facts = {}
            schedule = "default"
        how = (f"tuned: {facts['trials_measured']} of {c.tuning_trials} trials measured over "
               f"{facts['tasks_tuned']}/{facts['tasks']} operators ({len(facts['tasks_applied'])} built with their "
               f"tuned schedule) in {facts['seconds']:.0f} s"
               + (" (budget reached)" if facts["budget_reached"] else "")) if c.tuning_trials else "default schedules"
        step = f"tvm {target.kind.name}" + (f" batch {batch}" if batch else "") + f", {how}"
        artifact = source.derive("tvm", out, step, file=FILE, target=spec, target_resolved=resolved,
                                 batch_size=batch, tuning_trials=c.tuning_trials, schedule=schedule,
                                 tuning=facts or None, tvm_version=tvm.__version__)
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
        import tvm_ffi
        from tvm import relax

        tvm.get_global_func("runtime.config_threadpool")(0, max(1, threads))
        try:
            library = tvm.runtime.load_module(str(path))
        except Exception as e:  # a truncated or foreign .so
            raise MlkError(f"cannot load TVM library {path}: {type(e).__name__}: {e}") from e
        vm = relax.VirtualMachine(library, tvm.cpu())
        main = vm["main"]
        fixed = artifact.meta.get("batch_size")

        staging = threading.local()  # per thread: input shape -> (aligned array, the TVM tensor viewing it)

        def run_once(x: Any) -> Any:
            # The input is copied into an aligned staging array that TVM already holds (DLPack, made once per
            # shape): ~1 us for a digits row, where checking and wrapping each caller's array took ~4 us, and
            # tvm.runtime.tensor(x) + .numpy() 39 us, more than the MLP's whole computation. The output is
            # the VM's own fresh array, taken over through DLPack.
            held = staging.__dict__
            pair = held.get(x.shape)
            if pair is None:
                if len(held) >= MAX_STAGING_SHAPES:
                    held.clear()
                array = aligned(np.empty(x.shape, dtype=np.float32))
                pair = held[x.shape] = (array, tvm_ffi.from_dlpack(array))
            np.copyto(pair[0], x)
            out = np.from_dlpack(main(pair[1]))
            # a graph that returns its input (Identity) hands back the staging array itself: never return it
            return out.copy() if np.may_share_memory(out, pair[0]) else out

        return lambda x: run_in_chunks(run_once, x, fixed)


def aligned(x: Any) -> Any:
    """``x`` as a C-contiguous float32 array whose data start on a 64-byte boundary (a copy if needed)."""
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ctypes.data % ALIGNMENT == 0:
        return x
    raw = np.empty(x.nbytes + ALIGNMENT, dtype=np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    out = raw[offset:offset + x.nbytes].view(np.float32).reshape(x.shape)
    out[...] = x
    return out


def parse_target(text: str) -> dict[str, Any]:
    """``text`` (a kind, JSON, or ``llvm -key=value ...``) as a TVM target dict; CPU (llvm) targets only."""
    text = text.strip()
    spec: dict[str, Any]
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
    if spec.get("kind") != "llvm":
        raise Unavailable(f"the tvm compiler builds for the CPU (target kind 'llvm') only, not "
                          f"{spec.get('kind')!r}: its runner executes on this machine's CPU")
    return spec


def resolve_target(tvm: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with ``mcpu: native`` replaced by this machine's CPU name as LLVM knows it."""
    if spec.get("mcpu") != "native":
        return dict(spec)
    return {**spec, "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())}


def _target(tvm: Any, spec: dict[str, Any]) -> Any:
    try:
        return tvm.target.Target(spec)
    except Exception as e:  # unknown option names
        raise UserError(f"TVM rejects the target {json.dumps(spec)}: {e}", where="compile.target") from e


def import_onnx(model: Any, shape: list[int] | None) -> Any:
    """``model`` (an ``onnx.ModelProto``) as a Relax module for inference, its input fixed to ``shape`` when
    given (else the ONNX model's own, a symbolic batch staying symbolic)."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    feed = model.graph.input[0]
    try:
        mod = from_onnx(model, shape_dict=None if shape is None else {feed.name: shape},
                        dtype_dict={feed.name: "float32"}, keep_params_in_input=False)
    except Exception as e:  # the frontend raises bare errors for unsupported operators
        raise MlkError(f"TVM cannot import the ONNX model: {type(e).__name__}: {e}") from e
    return relax.transform.DecomposeOpsForInference()(mod)


def build_default(mod: Any, target: Any) -> Any:
    """``mod`` built with the Relax CPU pipeline (legalise, fold constants, fuse) and default schedules."""
    import tvm
    from tvm import relax

    return tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))


def _export(executable: Any, path: Path) -> None:
    try:
        executable.export_library(str(path))
    except Exception as e:  # linking needs a C compiler (TVM calls gcc / $CC)
        raise Unavailable(f"TVM could not link {path.name}; it needs a working C compiler (gcc or $CC): {e}") from e


# -- tuning ------------------------------------------------------------------------------------------------


@cache
def _tuning_problem() -> str | None:
    probe = subprocess.run([sys.executable, "-c", _TUNING_PROBE], capture_output=True, text=True, timeout=300)
    return None if probe.returncode == 0 else _why(probe)


def _check_tuning() -> None:
    problem = _tuning_problem()
    if problem is None:
        return
    from importlib import metadata

    versions = {d: _version(metadata, d) for d in ("apache-tvm", "apache-tvm-ffi")}
    raise Unavailable(
        f"MetaSchedule tuning does not work with apache-tvm {versions['apache-tvm']} and apache-tvm-ffi "
        f"{versions['apache-tvm-ffi']}: serialising a TIR object (tvm.ir.save_json), which MetaSchedule's "
        f"TuneContext needs, fails ({problem}). apache-tvm 0.27.0.post1 works with apache-tvm-ffi "
        f"0.1.14.post1 and crashes with 0.1.15; install that, or use tuning_trials: 0")


def _version(metadata: Any, dist: str) -> str:
    try:
        return str(metadata.version(dist))
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _why(probe: subprocess.CompletedProcess[str]) -> str:
    if probe.returncode < 0:
        try:
            return f"the process died of {signal.Signals(-probe.returncode).name}"
        except ValueError:
            return f"the process died of signal {-probe.returncode}"
    lines = [line.strip() for line in probe.stderr.splitlines() if line.strip()]
    return f"exit code {probe.returncode}" + (f": {lines[-1]}" if lines else "")


def _tune_in_child(onnx_file: Path, out: Path, target: dict[str, Any], shape: list[int] | None, c: TvmConfig,
                   inputs: CompileInputs) -> dict[str, Any]:
    """Run :func:`tune_and_build` in a child process (a crash inside TVM must not take the run down); its
    facts, or an error that says how it ended."""
    request = {"onnx": str(onnx_file), "out": str(out / FILE), "facts": str(out / TUNING_FILE), "target": target,
               "shape": shape, "trials": c.tuning_trials, "budget_s": c.tuning_budget_s, "prepack": c.weight_prepack,
               "threads": max(1, inputs.threads), "seed": inputs.seed}
    env = {**os.environ, "TVM_NUM_THREADS": str(max(1, inputs.threads))}
    with tempfile.TemporaryDirectory(prefix="mlk-tvm-tune-") as work:
        (Path(work) / "request.json").write_text(json.dumps(request))
        # the budget bounds measuring; building, search and the final build come on top
        limit = c.tuning_budget_s * 2 + 600
        child = run_reporting([sys.executable, "-m", "mlk_plugins.compilers.tvm", str(Path(work) / "request.json"),
                               work], env=env, limit_s=limit, report=inputs.report)
        if child is None:
            raise MlkError(f"TVM tuning did not finish within {limit:.0f} s")
    if child.returncode != 0 or not (out / TUNING_FILE).is_file():
        raise MlkError(f"TVM tuning failed ({_why(child)})")
    facts: dict[str, Any] = json.loads((out / TUNING_FILE).read_text())
    return facts


def run_reporting(argv: list[str], *, env: dict[str, str], limit_s: float,
                  report: Callable[[str], None]) -> subprocess.CompletedProcess[str] | None:
    """Run ``argv``, passing each output line that starts with :data:`PROGRESS` to ``report`` as it comes;
    the other lines (stdout and stderr together) are returned as the result's ``stderr``. None when the
    process was killed after ``limit_s`` seconds."""
    expired = threading.Event()
    kept: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as child:
        def kill() -> None:
            expired.set()
            child.kill()

        timer = threading.Timer(limit_s, kill)
        timer.start()
        try:
            assert child.stdout is not None
            for line in child.stdout:
                if line.startswith(PROGRESS):
                    report(line[len(PROGRESS):].rstrip())
                else:
                    kept.append(line)
            child.wait()
        finally:
            timer.cancel()
    if expired.is_set():
        return None
    return subprocess.CompletedProcess(argv, child.returncode, "", "".join(kept))


def _import_cpu_intrinsics() -> None:
    """Import TVM's x86 and ARM tensor intrinsics, not the whole ``tvm.s_tir.tensor_intrin`` package (whose
    CUDA, ROCm and Hexagon modules took over a minute to import on a loaded machine); MetaSchedule imports the
    package, which then finds it in ``sys.modules``."""
    import importlib
    import types

    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    package = types.ModuleType(name)
    package.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
    sys.modules[name] = package
    tvm.s_tir.tensor_intrin = package  # type: ignore[attr-defined]
    for part in ("x86", "arm_cpu"):
        importlib.import_module(f"{name}.{part}")


def tune_and_build(request: dict[str, Any], work: Path) -> dict[str, Any]:
    """Import the ONNX model, tune its fused operators with MetaSchedule (builds and timings in this process,
    an in-memory database), build the library with the best schedules and write it to ``request["out"]``."""
    import onnx

    _import_cpu_intrinsics()
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult
    from tvm.s_tir.meta_schedule.search_strategy import PySearchStrategy

    start = time.monotonic()
    deadline = math.inf  # set when the search starts
    built: dict[str, Any] = {}
    counts = {"built": 0, "measured": 0, "skipped": 0, "failed": 0}
    working = [0.0]  # seconds spent building and timing candidates (the rest of a round is the search)
    budget = float(request["budget_s"])
    said = [time.monotonic()]

    def progress(line: str) -> None:
        print(PROGRESS + line, flush=True)
        said[0] = time.monotonic()

    @derived_object
    class InProcessBuilder(PyBuilder):  # type: ignore[misc]
        def build(self, build_inputs: list[Any]) -> list[Any]:
            from tvm.driver import build as tvm_build
            from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

            results = []
            began = time.monotonic()
            for item in build_inputs:
                if time.monotonic() > deadline:  # proposed just before the budget ran out
                    counts["skipped"] += 1
                    results.append(BuilderResult(None, "tuning budget reached"))
                    continue
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(item.mod)
                    key = f"candidate-{counts['built']}"
                    counts["built"] += 1
                    built[key] = tvm_build(mod, target=item.target)
                    results.append(BuilderResult(key, None))
                except Exception as e:  # a candidate that does not compile is a failed trial, not an error
                    counts["failed"] += 1
                    results.append(BuilderResult(None, f"{type(e).__name__}: {e}"))
            working[0] += time.monotonic() - began
            return results

    @derived_object
    class UntilBudget(PySearchStrategy):  # type: ignore[misc]
        """MetaSchedule's evolutionary search, which proposes nothing once the budget is spent: the task
        ends there. (Otherwise every operator left in the round still ran its search, minutes on ResNet-18,
        though nothing more would be measured.) What was measured stays: the scheduler commits it as
        the round ends."""

        def __init__(self, inner: Any = None) -> None:
            super().__init__()
            self.inner = inner if inner is not None else ms.search_strategy.EvolutionarySearch()

        def _initialize_with_tune_context(self, context: Any) -> None:
            self.inner._initialize_with_tune_context(context)

        def pre_tuning(self, max_trials: int, num_trials_per_iter: int, design_spaces: Any, database: Any = None,
                       cost_model: Any = None) -> None:
            self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

        def post_tuning(self) -> None:
            self.inner.post_tuning()

        def generate_measure_candidates(self) -> Any:
            if time.monotonic() >= deadline:
                return None
            return self.inner.generate_measure_candidates()

        def notify_runner_results(self, candidates: Any, results: Any) -> None:
            self.inner.notify_runner_results(candidates, results)

        def clone(self) -> Any:
            return UntilBudget(self.inner.clone())

    @derived_object
    class Finished(PyRunnerFuture):  # type: ignore[misc]
        def __init__(self, result: Any) -> None:
            super().__init__()
            self.finished = result

        def done(self) -> bool:
            return True

        def result(self) -> Any:
            return self.finished

    @derived_object
    class InProcessRunner(PyRunner):  # type: ignore[misc]
        def run(self, runner_inputs: list[Any]) -> list[Any]:
            device = tvm.cpu()
            fill = tvm.get_global_func("tvm.contrib.random.random_fill")
            futures = []
            began = time.monotonic()
            for item in runner_inputs:
                try:
                    module = built.pop(item.artifact_path)
                    args = []
                    for info in item.args_info:
                        _, dtype, shape = info.as_json()
                        arg = tvm.runtime.empty([int(s) for s in shape], dtype=dtype, device=device)
                        fill(arg)
                        args.append(arg)
                    timer = module.time_evaluator(module.entry_name, device, number=3, repeat=1, min_repeat_ms=20)
                    seconds = [float(s) for s in timer(*args).results]
                    counts["measured"] += 1
                    futures.append(Finished(RunnerResult(seconds, None)))
                    if time.monotonic() - said[0] >= PROGRESS_EVERY_S:
                        progress(f"{counts['measured']} candidates measured; "
                                 f"{time.monotonic() - tuning_start:.0f} of {budget:.0f} s")
                except Exception as e:  # a candidate that fails at run time is a failed trial
                    counts["failed"] += 1
                    futures.append(Finished(RunnerResult(None, f"{type(e).__name__}: {e}")))
            working[0] += time.monotonic() - began
            return futures

    target = tvm.target.Target(request["target"] if "num-cores" in request["target"] else
                               {**request["target"], "num-cores": int(request["threads"])})
    mod = import_onnx(onnx.load(request["onnx"]), request["shape"])
    prepack = bool(request["prepack"])
    fused = fuse(mod, target, prepack=prepack)
    extracted = [t for t in ms.relax_integration.extract_tasks(fused, target)
                 if not t.mod.attrs.get("tirx.is_scheduled", False)]
    trials = int(request["trials"])
    database = ms.database.MemoryDatabase()
    tuning_start = time.monotonic()
    deadline = tuning_start + budget
    # In rounds of one batch of candidates per operator; no round starts after the budget, and within a
    # round no operator searches after it (UntilBudget). Each round's search starts from the best
    # schedules measured so far, which the database keeps. The first round is small, so that every
    # operator leaves the default schedule early (with 64 per operator from the start, ResNet-18's first
    # round alone outlasted a 600 s budget); each next one is twice as large, or more where the search
    # would take more than its share of the round (next_round_size), up to the cap.
    plan = round_plan(trials, len(extracted))
    # one cost model for all rounds: it keeps learning from every measurement (a new one each round
    # scored at random until it had 100 samples again)
    cost_model = ms.cost_model.CostModel.create(_cost_model(), num_tuning_cores=int(request["threads"]))
    sizes: list[int] = []
    stopped = False
    left, wanted = trials, FIRST_TRIALS_PER_ROUND
    progress(f"tuning {len(extracted)} operators: up to {trials} candidates in at most {len(plan)} rounds "
             f"within {budget:.0f} s")
    while left > 0 and extracted and time.monotonic() < deadline:
        per_round, n = round_size(left, len(extracted), wanted)
        round_start, worked_before = time.monotonic(), working[0]
        tried_before = counts["measured"] + counts["failed"]
        contexts = [ms.TuneContext(mod=t.dispatched[0], target=t.target, space_generator="post-order-apply",
                                   search_strategy=UntilBudget(), task_name=t.task_name,
                                   num_threads=int(request["threads"]),
                                   rand_state=int(request["seed"]) + 1000 * len(sizes) + i)
                    for i, t in enumerate(extracted)]
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=[float(t.weight) for t in extracted], work_dir=str(work),
            max_trials_global=n, num_trials_per_iter=per_round, builder=InProcessBuilder(),
            runner=InProcessRunner(), database=database, cost_model=cost_model,
            measure_callbacks=[ms.measure_callback.AddToDatabase(), ms.measure_callback.UpdateCostModel()])
        sizes.append(per_round)
        left -= n
        stopped = time.monotonic() >= deadline
        worked = working[0] - worked_before
        searched = time.monotonic() - round_start - worked
        tried = counts["measured"] + counts["failed"] - tried_before
        wanted = next_round_size(per_round, searched / len(extracted), worked / tried if tried else 0.0)
        best = best_seconds(database, extracted)
        progress(f"round {len(sizes)} ({per_round} per operator)" + (" (budget reached)" if stopped else "")
                 + f": {counts['measured']} candidates measured, {len(best)}/{len(extracted)} operators tuned, "
                 f"at their best they take {per_call(best, extracted) * 1e3:.3f} ms a call; "
                 f"searching took {searched:.0f} s, "
                 f"building and timing {worked:.0f} s; {time.monotonic() - tuning_start:.0f} of {budget:.0f} s")
        if stopped:
            break
    tuned_seconds = time.monotonic() - tuning_start
    best = best_seconds(database, extracted)
    progress("building the library with the tuned schedules")
    executable, applied = build_tuned(mod, target, database, prepack=prepack)
    _export(executable, Path(request["out"]))
    return {"tasks": len(extracted), "tasks_tuned": len(best), "tasks_applied": applied, "trials": trials,
            "trials_measured": counts["measured"], "trials_failed": counts["failed"],
            "trials_skipped_budget": counts["skipped"], "budget_s": budget,
            "budget_reached": stopped or (left > 0 and bool(extracted)), "rounds": len(sizes),
            "trials_per_operator_by_round": sizes, "cost_model": _cost_model(),
            "tuning_seconds": tuned_seconds, "seconds": time.monotonic() - start,
            "best_us": {k: round(v * 1e6, 3) for k, v in sorted(best.items())},
            "calls_per_run": {str(t.task_name): int(t.weight) for t in extracted},
            "tuned_ms_per_run": round(per_call(best, extracted) * 1e3, 4)}


def best_seconds(database: Any, tasks: list[Any]) -> dict[str, float]:
    """Each tuned operator's best measured time (seconds, the mean of its timing runs) in ``database``."""
    best: dict[str, float] = {}
    for task in tasks:
        workload = task.dispatched[0]
        top = database.get_top_k(database.commit_workload(workload), 1) if database.has_workload(workload) else []
        if top and top[0].run_secs:
            best[str(task.task_name)] = sum(float(s) for s in top[0].run_secs) / len(top[0].run_secs)
    return best


def per_call(best: dict[str, float], tasks: list[Any]) -> float:
    """Seconds a call of the model spends in the tuned operators at their ``best`` times (from
    :func:`best_seconds`): an operator that the model calls twice (a task of weight 2) counts twice."""
    return sum(best[str(t.task_name)] * float(t.weight) for t in tasks if str(t.task_name) in best)


def round_plan(trials: int, operators: int) -> list[tuple[int, int]]:
    """The tuning rounds that spend ``trials`` candidates over ``operators`` operators when each round
    only doubles (:func:`next_round_size`): per round, the candidates per operator and in all. The first
    round gives each operator ``FIRST_TRIALS_PER_ROUND``, each next round twice as many, up to
    ``MAX_TRIALS_PER_ROUND``; the last rounds share out what is left (:func:`round_size`). Tuning runs at
    most this many rounds."""
    plan: list[tuple[int, int]] = []
    left, wanted = trials, FIRST_TRIALS_PER_ROUND
    while left > 0 and operators > 0:
        plan.append(round_size(left, operators, wanted))
        left -= plan[-1][1]
        wanted = next_round_size(plan[-1][0], 0.0, 0.0)
    return plan


def round_size(left: int, operators: int, wanted: int) -> tuple[int, int]:
    """A round of up to ``wanted`` candidates per operator when ``left`` candidates remain: per operator,
    and in all. Every operator gets the same number (MetaSchedule checks a round's total only between
    operators, so a round of 16 per operator capped at 24 in all measured 34); a rest smaller than the
    number of operators is a round of one candidate each, up to it."""
    if left >= operators:
        share = min(wanted, left // operators)
        return share, share * operators
    return 1, left


def next_round_size(size: int, search_s: float, candidate_s: float) -> int:
    """Candidates per operator in the round after one of ``size``: twice as many, up to
    ``MAX_TRIALS_PER_ROUND``; and at least enough that the search, which took ``search_s`` per operator
    in the last round whatever it proposed, is at most ``SEARCH_SHARE`` of the next, where a candidate
    takes ``candidate_s`` to build and time. (On ResNet-18 an operator's search took ~17 s and a
    candidate ~0.6 s: in rounds of 8 per operator, four fifths of the tuning time went to the search.)"""
    wanted = 2 * size
    if search_s > 0 and candidate_s > 0:
        wanted = max(wanted, math.ceil(search_s * (1 / SEARCH_SHARE - 1) / candidate_s))
    return min(MAX_TRIALS_PER_ROUND, wanted)


def fuse(mod: Any, target: Any, database: Any = None, prepack: bool = False) -> Any:
    """``mod`` through the first half of Relax's CPU pipeline (library dispatch, legalisation, constant
    folding, operator fusion); with ``database``, every fused operator that has a tuning record there then
    gets its best schedule (``MetaScheduleApplyDatabase``). With ``prepack``, operators' weight arguments
    are marked layout-free first, so that a schedule may rewrite their layout (see :func:`build_tuned`).

    Tasks are extracted from, and records applied to, the output of these same passes: a record is found
    by the structure of its operator, attributes included. (MetaSchedule's ``compile_relax`` runs the fusion
    passes itself; handed an already fused module, it added an ``op_pattern`` attribute to each fused
    operator, no record matched, and the "tuned" library had default schedules throughout.)"""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline
    from tvm.relax.transform import AttachAttrLayoutFreeBuffers, MetaScheduleApplyDatabase

    passes = [*pipeline.library_dispatch_passes(target), *pipeline.legalize_passes(target),
              *([AttachAttrLayoutFreeBuffers()] if prepack else [])]
    with target, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(passes)(mod)
    if database is None:
        return fused
    with target, database, tvm.transform.PassContext(opt_level=3):
        return MetaScheduleApplyDatabase()(fused)


def build_tuned(mod: Any, target: Any, database: Any, prepack: bool = False) -> tuple[Any, list[str]]:
    """``mod`` fused, its operators scheduled from ``database`` where it has them, then lowered and built
    (the second half of Relax's CPU pipeline); the executable and the operators built with a tuned schedule.
    With ``prepack``, the weight-layout rewrites the schedules chose are split out of the operators and
    computed on the (constant) weights now, so that the library holds the weights repacked."""
    import tvm
    from tvm import relax, tirx
    from tvm.relax.backend.cpu_generic import pipeline

    scheduled = fuse(mod, target, database, prepack=prepack)
    applied = sorted(gv.name_hint for gv, f in scheduled.functions.items()
                     if isinstance(f, tirx.PrimFunc) and f.attrs is not None and "tirx.is_scheduled" in f.attrs)
    if prepack:
        with target, tvm.transform.PassContext(opt_level=3):
            scheduled = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(),
                                                  relax.transform.FoldConstant()])(scheduled)
    lower = tvm.transform.Sequential([*pipeline.dataflow_lower_passes(target), *pipeline.finalize_passes(target)])
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(scheduled, target=target, relax_pipeline=lower), applied


def _cost_model() -> str:
    """MetaSchedule's XGBoost cost model when xgboost is installed, else random scores."""
    import importlib.util

    return "xgb" if importlib.util.find_spec("xgboost") is not None else "random"


def _main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    facts = tune_and_build(request, Path(argv[1]))
    Path(request["facts"]).write_text(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
