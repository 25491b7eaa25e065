"""Every measured form of one trained model, built through mlk's own compiler classes.

The classes come from mlk's registry (entry-point group ``mlk.compilers``), exactly as a spec's
``compile:`` section gets them; each step's artifact is loaded with that compiler's own
``runner(artifact, threads)``, except the torch forms, which run as eager ``nn.Module`` calls:

- ``eager``: the trained module, ``torch.no_grad()``, eval mode.
- ``ort_fp32``: ``onnx`` (dynamo exporter, symbolic batch) then ``onnxruntime`` (optimization all).
- ``ort_int8_static_pc`` / ``ort_int8_static_pt``: ``onnxruntime`` static int8, QDQ, weights per
  channel / per tensor, 256 calibration images from the training split.
- ``ort_int8_dynamic``: ``onnxruntime`` dynamic int8 (weights int8, activations quantised at run time).
- ``tvm``: ``tvm`` with TVM's default schedules (target ``llvm -mcpu=native``, symbolic batch): one
  library for both batch sizes.
- ``tvm_tuned_b1`` / ``tvm_tuned_b32``: ``tvm`` tuned with MetaSchedule for batch 1 / batch 32
  (``tuning_trials`` candidates within ``tuning_budget_s``); each library takes its own batch size
  only, so at the other size the runner feeds chunks (batch 32 through the batch-1 library is 32
  calls; batch 1 through the batch-32 library pads to 32). Where tuning cannot work with the installed
  TVM the plugin raises ``Unavailable`` and the message is recorded.
- ``tvm_tuned_prepack_b1`` / ``tvm_tuned_prepack_b32``: the same with ``weight_prepack: true`` (each
  schedule may store its weights in the layout it reads). Only on request (``--variants``): each is
  another tuning budget.
- ``fold_bn``, ``prune``: the ``fold_bn`` and ``prune`` (structured 50 %, short fine-tune) passes,
  run eagerly like ``eager`` (the module rebuilt from the pass's artifact with ``load_module``).
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THREADS = 2
CALIBRATION = 256


@dataclass
class Variant:
    """One measured form of a model."""

    key: str
    label: str
    run: Callable[[Any], Any]
    file: Path
    compile_s: float
    steps: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return self.file.stat().st_size


@dataclass
class Built:
    """What :func:`build_variants` made: the variants in measuring order and the attempts that failed."""

    variants: list[Variant]
    unavailable: dict[str, str]
    errors: dict[str, str]


LABELS = {
    "eager": "torch eager",
    "ort_fp32": "ORT fp32",
    "ort_int8_static_pc": "ORT int8 static, per-channel",
    "ort_int8_static_pt": "ORT int8 static, per-tensor",
    "ort_int8_dynamic": "ORT int8 dynamic",
    "tvm": "TVM default schedules",
    "tvm_tuned_b1": "TVM tuned for batch 1",
    "tvm_tuned_b32": "TVM tuned for batch 32",
    "tvm_tuned_prepack_b1": "TVM tuned for batch 1, weights prepacked",
    "tvm_tuned_prepack_b32": "TVM tuned for batch 32, weights prepacked",
    "fold_bn": "fold_bn (eager)",
    "prune": "prune 50% channels (eager)",
}
ALL = tuple(LABELS)
#: the variants tuned by MetaSchedule, by the batch size they are built for
TUNED = {"tvm_tuned_b1": 1, "tvm_tuned_b32": 32}
PREPACKED = {"tvm_tuned_prepack_b1": 1, "tvm_tuned_prepack_b32": 32}
#: what a run without --variants builds (the prepacked variants double the tuning time)
DEFAULT = tuple(k for k in ALL if k not in PREPACKED)


def compiler(name: str, **options: Any) -> Any:
    """An instance of the ``mlk.compilers`` plugin ``name`` with a validated config."""
    from mlk.registry import registry

    cls = registry().get("compilers", name, where=f"compile.{name}")
    return cls(cls.Config(name=name, **options))


def eager_runner(module: Any, threads: int = THREADS) -> Callable[[Any], Any]:
    """``module`` called eagerly on a numpy batch, without autograd, in eval mode."""
    import torch

    module.eval()

    torch.set_num_threads(threads)

    def run(x: Any) -> Any:
        with torch.no_grad():
            return module(torch.from_numpy(x))

    return run


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def build_variants(trained: dict[str, Any], section: dict[str, Any], work: Path, *, prune_epochs: int = 2,
                   only: tuple[str, ...] = DEFAULT, tuning_trials: int = 64, tuning_budget_s: float = 1800.0,
                   seed: int = 0,
                   log: Callable[[str], None] = print) -> Built:
    """Compile ``trained`` (from :func:`benchmarks.compile.models.train`) into every variant in ``only``,
    under ``work``. Compile times and load averages go in each variant's ``facts``."""
    from mlk.compiler import CompileInputs, Unavailable
    from mlk_plugins.frameworks.torch.artifacts import load_module, write_artifact

    splits, meta = trained["splits"], trained["meta"]
    inputs = CompileInputs(calibration=splits.train[0][:CALIBRATION], data=splits, threads=THREADS, seed=seed,
                           report=lambda line: log(f"    {line}"))  # e.g. TVM's tuning rounds
    variants: list[Variant] = []
    unavailable: dict[str, str] = {}
    errors: dict[str, str] = {}

    start = time.perf_counter()
    source = write_artifact(trained["module"], _fresh(work / "torch"), None, meta,
                            {"model": section, "meta": meta}, "benchmark source")
    variants.append(Variant("eager", LABELS["eager"], eager_runner(trained["module"]), source.file,
                            time.perf_counter() - start, list(source.meta["steps"])))

    def step(key: str, make: Callable[[], tuple[Any, Callable[[Any], Any]]]) -> Any:
        if key not in only:
            return None
        log(f"  compiling {key}")
        load_before = _loadavg()
        t0 = time.perf_counter()
        try:
            artifact, run = make()
        except Unavailable as e:
            unavailable[key] = str(e)
            log(f"  {key}: unavailable: {e}")
            return None
        except Exception as e:  # one broken compiler must not end the benchmark; the error is reported
            errors[key] = f"{type(e).__name__}: {e}"
            log(f"  {key}: FAILED: {traceback.format_exc()}")
            return None
        seconds = time.perf_counter() - t0
        facts = {"loadavg_before": load_before, "loadavg_after": _loadavg()}
        for name in ("opset", "optimization", "quantize", "per_channel", "calibration_examples", "target",
                     "batch_size", "tuning_trials", "schedule", "tuning", "target_resolved", "tvm_version",
                     "onnx_nodes", "passes"):
            if name in artifact.meta:
                facts[name] = artifact.meta[name]
        variants.append(Variant(key, LABELS[key], run, artifact.file, seconds, list(artifact.meta["steps"]), facts))
        return artifact

    onnx_dir = work / "onnx"
    t0 = time.perf_counter()
    onnx = compiler("onnx").compile(source, _fresh(onnx_dir), inputs)
    onnx_s = time.perf_counter() - t0

    def ort(key: str, **options: Any) -> None:
        def make() -> tuple[Any, Callable[[Any], Any]]:
            c = compiler("onnxruntime", optimization="all", **options)
            artifact = c.compile(onnx, _fresh(work / key), inputs)
            return artifact, c.runner(artifact, THREADS)
        if step(key, make) is not None:
            variants[-1].compile_s += onnx_s
            variants[-1].facts["onnx_export_s"] = onnx_s

    ort("ort_fp32")
    ort("ort_int8_static_pc", quantize="static", per_channel=True, calibration_size=CALIBRATION)
    ort("ort_int8_static_pt", quantize="static", per_channel=False, calibration_size=CALIBRATION)
    ort("ort_int8_dynamic", quantize="dynamic")

    def tvm(key: str, **options: Any) -> None:
        facts: dict[str, Any] = {}

        def make() -> tuple[Any, Callable[[Any], Any]]:
            c = compiler("tvm", target="llvm -mcpu=native", **options)
            artifact = c.compile(onnx, _fresh(work / key), inputs)
            # The runner's runtime.config_threadpool(0, threads) pins the calling (main) thread to one core
            # (TVM binds "worker 0", the caller); torch and ORT, called from the same thread, would then be
            # confined to that core too. Undo it after recording it: TVM's other pool threads keep their own
            # cores, and the other variants keep both cores.
            before = os.sched_getaffinity(0)
            run = c.runner(artifact, THREADS)
            pinned = os.sched_getaffinity(0)
            os.sched_setaffinity(0, before)
            facts.update(affinity_before_runner=sorted(before), affinity_after_runner=sorted(pinned),
                         affinity_restored=sorted(os.sched_getaffinity(0)),
                         tvm_num_threads_env=os.environ.get("TVM_NUM_THREADS"))
            return artifact, run

        if step(key, make) is not None:
            variants[-1].compile_s += onnx_s
            variants[-1].facts.update(facts, onnx_export_s=onnx_s)

    tvm("tvm")
    if tuning_trials:
        for key, batch in {**TUNED, **PREPACKED}.items():
            tvm(key, batch_size=batch, tuning_trials=tuning_trials, tuning_budget_s=tuning_budget_s,
                weight_prepack=key in PREPACKED)

    def torch_pass(key: str, name: str, **options: Any) -> None:
        def make() -> tuple[Any, Callable[[Any], Any]]:
            artifact = compiler(name, **options).compile(source, _fresh(work / key), inputs)
            return artifact, eager_runner(load_module(artifact))
        step(key, make)

    torch_pass("fold_bn", "fold_bn")
    torch_pass("prune", "prune", amount=0.5, structured=True, finetune_epochs=prune_epochs, batch_size=64)
    return Built(variants, unavailable, errors)
