"""``coreml``: a torch artifact to a Core ML ML Program package (``model.mlpackage``).

The torch artifact's ``torch.export`` program, decomposed to core ATen ops, goes through
``coremltools.convert(..., convert_to="mlprogram")``; batch norm is folded into convolutions and the
batch axis stays flexible. Input and output stay float32 whatever the compute precision, so the
package takes the same batches as every other runner. Core ML predicts only on macOS: elsewhere
the package is built and its spec is read back and checked (input name and shape, output, ops),
and its runner raises :class:`~mlk.compiler.Unavailable` saying so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from mlk.compiler import Artifact, CompileConfig, CompileInputs, Compiler, Runner, Unavailable
from mlk.errors import MlkError, UserError

FILE = "model.mlpackage"


class CoremlConfig(CompileConfig):
    """``compile:`` entry of ``name: coreml``."""

    precision: Literal["fp16", "fp32"] = Field(
        "fp16", description="compute precision of the ML Program (inputs and outputs stay float32)")
    minimum_deployment_target: str = Field(
        "iOS16", pattern=r"^(iOS|macOS|watchOS|tvOS|visionOS)\d+$",
        description="oldest OS the package must run on, a coremltools.target name (iOS15 or later for ML Programs)")


class CoremlCompiler(Compiler):
    """torch.export program to a Core ML ML Program (fp16 or fp32); predicts on macOS only."""

    name = "coreml"
    Config: ClassVar[type[CoremlConfig]] = CoremlConfig
    accepts = ("torch",)
    produces = "coreml"
    requires = ("coremltools", "torch")
    extra = "coreml"
    config: CoremlConfig

    def describe(self, source_format: str) -> str:
        return f"{self.name}: {source_format} -> {self.produces} ({self.config.precision}, " \
               f"{self.config.minimum_deployment_target})"

    def compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        with _quiet_coremltools():
            return self._compile(source, out, inputs)

    def _compile(self, source: Artifact, out: Path, inputs: CompileInputs) -> Artifact:
        import coremltools as ct
        import numpy as np
        import torch

        cfg = self.config
        target = getattr(ct.target, cfg.minimum_deployment_target, None)
        if target is None:
            raise UserError(f"coremltools {ct.__version__} has no deployment target "
                            f"'{cfg.minimum_deployment_target}'", where="compile.minimum_deployment_target",
                            choices=[t.name for t in ct.target], got=cfg.minimum_deployment_target)
        input_name = source.meta.get("input_name", "x")
        output_name = source.meta.get("output_name", "logits")
        program = torch.export.load(str(source.path / source.meta.get("file", "model.pt2")))
        program = program.run_decompositions({})
        precision = ct.precision.FLOAT16 if cfg.precision == "fp16" else ct.precision.FLOAT32
        mlmodel = ct.convert(
            program,
            convert_to="mlprogram",
            inputs=[ct.TensorType(name=input_name, dtype=np.float32)],
            outputs=[ct.TensorType(name=output_name, dtype=np.float32)],
            compute_precision=precision,
            minimum_deployment_target=target,
        )
        mlmodel.short_description = f"mlk {source.meta.get('trial_id', 'model')} ({cfg.precision})"
        mlmodel.save(str(out / FILE))
        facts = check_package(out / FILE, input_name, output_name, [int(d) for d in source.meta["input_shape"]])
        facts.update(precision=cfg.precision, minimum_deployment_target=cfg.minimum_deployment_target,
                     coremltools=ct.__version__, frontend="torch.export")
        artifact = source.derive(self.produces, out, f"{cfg.id or self.name} ({cfg.precision})", file=FILE,
                                 coreml=facts)
        artifact.save_meta()
        return artifact

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        facts = artifact.meta.get("coreml", {})
        if sys.platform != "darwin":
            raise Unavailable(f"CoreML prediction needs macOS; the package's spec was checked here: {summary(facts)}")
        import coremltools as ct
        import numpy as np

        model = ct.models.MLModel(str(artifact.file), compute_units=ct.ComputeUnit.CPU_ONLY)
        input_name = facts.get("input", {}).get("name", artifact.meta.get("input_name", "x"))
        output_name = facts.get("output", {}).get("name", artifact.meta.get("output_name", "logits"))

        def run(x: Any) -> Any:
            got = model.predict({input_name: np.ascontiguousarray(x, dtype=np.float32)})
            return np.asarray(got[output_name], dtype=np.float32)

        return run


def check_package(path: Path, input_name: str, output_name: str, input_shape: list[int]) -> dict[str, Any]:
    """Read a saved package's spec back (no prediction needed) and check it; returns its facts."""
    import coremltools as ct
    from coremltools.proto import FeatureTypes_pb2

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise MlkError(f"{path.name} is a {spec.WhichOneof('Type')} model, not an ML Program")
    inputs, outputs = list(spec.description.input), list(spec.description.output)
    if [i.name for i in inputs] != [input_name] or [o.name for o in outputs] != [output_name]:
        raise MlkError(f"{path.name} has inputs {[i.name for i in inputs]} and outputs {[o.name for o in outputs]}, "
                       f"expected ['{input_name}'] and ['{output_name}']")
    array = inputs[0].type.multiArrayType
    shape = [int(d) for d in array.shape]
    ranges = [[int(r.lowerBound), int(r.upperBound)] for r in array.shapeRange.sizeRanges]
    if shape[1:] != input_shape:
        raise MlkError(f"{path.name} takes inputs of shape {shape[1:]} per example, expected {input_shape}")
    if not ranges or ranges[0][0] > 1 or (0 <= ranges[0][1] < 2):
        raise MlkError(f"{path.name} has a fixed batch axis ({ranges or shape}); expected a flexible one")
    dtypes = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
    ops: Counter[str] = Counter()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            _count_ops(block, ops)
    return {
        "input": {"name": input_name, "shape": shape, "batch_range": ranges[0],
                  "dtype": dtypes.Name(array.dataType)},
        "output": {"name": output_name, "dtype": dtypes.Name(outputs[0].type.multiArrayType.dataType)},
        "specification_version": int(spec.specificationVersion),
        "ops": sum(ops.values()),
        "op_types": dict(sorted(ops.items())),
    }


def summary(facts: dict[str, Any]) -> str:
    """One line about a checked package, for messages."""
    if not facts:
        return "no facts recorded"
    inp, out = facts["input"], facts["output"]
    compute = [t for t in facts["op_types"] if t not in ("const", "cast")]
    return (f"input '{inp['name']}' {inp['dtype']} {inp['shape'][1:]} (batch {inp['batch_range'][0]}-"
            f"{inp['batch_range'][1]}), output '{out['name']}' {out['dtype']}, {facts['ops']} ops "
            f"({', '.join(compute)}), {facts['precision']}, spec v{facts['specification_version']}")


def _count_ops(block: Any, ops: Counter[str]) -> None:
    for op in block.operations:
        ops[op.type] += 1
        for inner in op.blocks:
            _count_ops(inner, ops)


@contextlib.contextmanager
def _quiet_coremltools() -> Iterator[None]:
    """coremltools logs a warning per missing macOS runtime proxy on import and draws progress bars for
    every conversion pass; mlk's own progress line says what is happening, so both are silenced."""
    logger = logging.getLogger("coremltools")
    level, previous = logger.level, os.environ.get("TQDM_DISABLE")
    logger.setLevel(logging.ERROR)
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        logger.setLevel(level)
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous

