"""``onnx``: a ``torch`` artifact (``model.pt2``) exported to ONNX (``model.onnx``).

Two exporters: ``dynamo`` (the default of torch >= 2.9: ``torch.onnx.export(..., dynamo=True)`` on the
ExportedProgram, which needs onnxscript) and ``torchscript`` (the legacy tracer, run on the program's
``.module()``). The input is named ``x`` and the output ``logits``; the batch axis stays symbolic
(``batch``) unless ``dynamic_batch: false``, which fixes it at 1 (meta ``batch_size``: the fixed
batch, or None). Opsets below 18 come from the torchscript exporter directly, or from the dynamo
exporter's opset-18 model through ``onnx.version_converter``. ``cleanup`` runs onnxscript's
optimizer (constant folding, removal of Identity and unused nodes, function inlining) and records
the node counts before and after. The model is checked with ``onnx.checker`` before it is written.

The helpers :func:`load_onnx`, :func:`ort_runner` and :func:`run_in_chunks` are shared with the
``onnxruntime`` and ``tvm`` compilers.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from mlk.compiler import Artifact, CompileConfig, CompileInputs, Compiler, Runner, Unavailable
from mlk.errors import MlkError, UserError

FILE = "model.onnx"
INPUT = "x"
OUTPUT = "logits"


class OnnxConfig(CompileConfig):
    """``compile:`` entry of ``name: onnx``."""

    opset: int = Field(18, ge=7, description="ONNX opset of the default domain; the dynamo exporter writes 18+ "
                                             "and converts down with onnx's version converter, which fails "
                                             "below 14 (use the torchscript exporter there)")
    exporter: Literal["dynamo", "torchscript"] = Field(
        "dynamo", description="dynamo: torch.onnx.export(dynamo=True) on the ExportedProgram (needs onnxscript); "
                              "torchscript: the legacy tracing exporter on the program's module")
    dynamic_batch: bool = Field(True, description="keep the batch axis symbolic; false fixes it at 1 (the "
                                                  "runner then feeds larger batches one example at a time)")
    cleanup: bool = Field(True, description="constant folding and removal of Identity/unused nodes with "
                                            "onnxscript's optimizer (node counts before/after go in the meta)")


class OnnxCompiler(Compiler):
    """Export a torch artifact (its ExportedProgram) to an ONNX model, input ``x``, output ``logits``."""

    name = "onnx"
    Config: ClassVar[type[OnnxConfig]] = OnnxConfig
    accepts = ("torch",)
    produces = "onnx"
    requires = ("torch", "onnx", "onnxscript")
    extra = "onnx"
    config: OnnxConfig

    def describe(self, source_format: str) -> str:
        c = self.config
        batch = "dynamic batch" if c.dynamic_batch else "batch 1"
        return f"{self.name}: {source_format} -> onnx (opset {c.opset}, {c.exporter} exporter, {batch})"

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        import onnx

        c = self.config
        program = _load_program(source)
        shape = list(source.meta["input_shape"])
        # tracer, deprecation and training-mode notices of the exporters; "torchvision is not installed"
        with warnings.catch_warnings(), _quiet("torch.onnx"):
            warnings.simplefilter("ignore")
            if c.exporter == "dynamo":
                model = _export_dynamo(program, shape, c.opset, c.dynamic_batch)
            else:
                model = _export_torchscript(program, shape, c.opset, c.dynamic_batch)
        before = _count_nodes(model)
        if c.cleanup:
            model = _cleanup(model)
        if _opset(model) > c.opset:
            model = _convert_opset(model, c.opset)
        after = _count_nodes(model)
        try:
            onnx.checker.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise MlkError(f"the exported ONNX model of {source.path} is invalid: {e}") from e
        onnx.save(model, str(out / FILE))
        opset = _opset(model)
        batch = None if c.dynamic_batch else 1
        step = f"onnx opset {opset} ({c.exporter}{', cleanup' if c.cleanup else ''})"
        artifact = source.derive(
            "onnx", out, step, file=FILE, opset=opset, exporter=c.exporter, input_name=INPUT, output_name=OUTPUT,
            batch_size=batch, onnx_nodes={"exported": before, "final": after})
        artifact.save_meta()
        return artifact

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        return ort_runner(artifact.file, threads)


# -- export ------------------------------------------------------------------------------------------


def _load_program(source: Artifact) -> Any:
    import torch

    path = source.path / "model.pt2"
    if not path.is_file():
        raise MlkError(f"torch artifact {source.path} has no model.pt2 (the torch.export program to convert)")
    try:
        with _quiet("torch.export"):  # it logs a traceback before raising
            return torch.export.load(str(path))
    except Exception as e:  # torch raises many types (zip, pickle, version errors) for a bad file
        raise MlkError(f"cannot load {path} as a torch.export program ({type(e).__name__}: {e}); "
                       "re-export the model") from e


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only errors from the ``logger`` hierarchy while inside."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _example(shape: list[int], batch: int) -> Any:
    import torch

    return torch.zeros((batch, *shape), dtype=torch.float32)


def _export_dynamo(program: Any, shape: list[int], opset: int, dynamic_batch: bool) -> Any:
    import torch

    # It writes opset 18 at least; lower ones are converted after the cleanup (see _convert_opset).
    common = {"input_names": [INPUT], "output_names": [OUTPUT], "opset_version": max(opset, 18), "dynamo": True,
              "optimize": False, "verbose": False, "external_data": False}
    if dynamic_batch:
        # The program's batch axis is already symbolic; dynamic_shapes only names it "batch".
        onnx_program = torch.onnx.export(program, (_example(shape, 2),), None,
                                         dynamic_shapes=({0: torch.export.Dim("batch")},), **common)
    else:
        onnx_program = torch.onnx.export(program.module(), (_example(shape, 1),), None, **common)
    return onnx_program.model_proto


def _traceable(module: Any) -> Any:
    """An ``nn.Module`` around an ExportedProgram's module for the TorchScript exporter, which calls
    ``train(False)`` before tracing (the program's module refuses any ``train`` call)."""
    from torch import nn

    class Traceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.program = module

        def train(self, mode: bool = True) -> Traceable:
            return self

        def forward(self, x: Any) -> Any:
            return self.program(x)

    return Traceable()


def _export_torchscript(program: Any, shape: list[int], opset: int, dynamic_batch: bool) -> Any:
    import io

    import onnx
    import torch

    buffer = io.BytesIO()
    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if dynamic_batch else None
    torch.onnx.export(_traceable(program.module()), (_example(shape, 2 if dynamic_batch else 1),), buffer,
                      input_names=[INPUT], output_names=[OUTPUT], opset_version=opset, dynamo=False,
                      dynamic_axes=axes, do_constant_folding=True)
    return onnx.load_model_from_string(buffer.getvalue())


def _cleanup(model: Any) -> Any:
    from onnxscript import optimizer

    return optimizer.optimize(model)


def _opset(model: Any) -> int:
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def _convert_opset(model: Any, opset: int) -> Any:
    """``model`` converted down to ``opset`` with onnx's version converter."""
    import onnx.version_converter

    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as e:  # the converter raises RuntimeError for operators it has no adapter for
        raise UserError(f"cannot convert the exported model from opset {_opset(model)} down to {opset}: {e}",
                        where="compile.opset", hint="use exporter: torchscript (it writes low opsets directly), "
                                                    "keep cleanup: true, or ask for a higher opset") from e


def _count_nodes(model: Any) -> int:
    return len(model.graph.node)


# -- shared with onnxruntime and tvm ---------------------------------------------------------------


def load_onnx(path: Path) -> Any:
    """``path`` as an ``onnx.ModelProto``, with a clear error when it is missing or not ONNX."""
    import onnx

    if not path.is_file():
        raise MlkError(f"ONNX model {path} does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # protobuf DecodeError, checker ValidationError, OSError ...
        raise MlkError(f"{path} is not a valid ONNX model ({type(e).__name__}: {e})") from e
    if not model.graph.node:
        raise MlkError(f"{path} is not a valid ONNX model (its graph has no nodes)")
    return model


def run_in_chunks(run: Runner, x: Any, batch: int | None) -> Any:
    """``run`` on ``x`` when the model takes any batch size (``batch`` None); otherwise ``x`` in chunks of
    ``batch`` (the last one padded with zeros and the padding's outputs dropped)."""
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    if batch is None or len(x) == batch:
        return run(x)
    outputs = []
    for start in range(0, max(len(x), 1), batch):
        chunk = x[start:start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *x.shape[1:]), dtype=np.float32)])
        outputs.append(run(chunk)[:n])
    return np.concatenate(outputs)


def ort_session(path: Path, threads: int, optimize: bool = True) -> Any:
    """An onnxruntime CPU session on ``path`` with ``threads`` intra-op threads."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise Unavailable(f"running an ONNX model here needs onnxruntime, which is not installed ({e}); "
                          'install it with: pip install "mlk-kernel[onnx]"') from e

    if not path.is_file():
        raise MlkError(f"ONNX model {path} does not exist")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/InvalidProtobuf types
        raise MlkError(f"onnxruntime cannot load {path} ({type(e).__name__}: {e})") from e


def ort_runner(path: Path, threads: int, optimize: bool = True) -> Runner:
    """A runner (numpy batch -> numpy logits) on an onnxruntime CPU session; any batch size is accepted."""
    session = ort_session(path, threads, optimize)
    feed = session.get_inputs()[0]
    first = feed.shape[0] if feed.shape else None
    fixed = first if isinstance(first, int) and first > 0 else None

    def run_once(x: Any) -> Any:
        return session.run(None, {feed.name: x})[0]

    return lambda x: run_in_chunks(run_once, x, fixed)
