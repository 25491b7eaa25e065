"""``compile/<id>`` nodes: plan the chain of compile steps by format, and run one step.

The plan takes the spec's ``compile:`` entries in order. Each step reads the latest earlier
artifact in a format it accepts (or the step named by its ``input``). When there is none, the
kernel inserts the shortest chain of installed compilers that makes one (``tvm`` after ``torch``
gets an ``onnx`` step in front), so a plugin that needs a format never needs a spec template.
Deploy targets get their formats the same way (:func:`plan_steps` with ``wanted`` and ``after``).

One spec serves every framework: a step whose compiler cannot reach the framework's artifact is
done by a *stand-in*, an installed compiler making the same format from what is there (``onnx``
under ``framework.name=keras`` is done by ``keras_onnx``), keeping the step's id and options. When
there is none, the step is planned as unavailable with the reason, like a runtime missing here,
and the rest of the run goes on.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlk.compiler import CompileInputs, Compiler, Unavailable
from mlk.errors import UserError
from mlk.graph import Node
from mlk.spec import validate_section
from mlk.stages.artifacts import best_trial_context, fetch_artifact, store_artifact
from mlk.trial import derive_seed

EXPORT = "export"


@dataclass
class Step:
    """One planned compile step."""

    id: str
    config: dict[str, Any]
    input: str            # node id of its source artifact
    produces: str
    source_format: str = ""
    inserted_for: str | None = None
    needs: tuple[str, ...] = field(default_factory=tuple)
    stands_in_for: str | None = None  # the compiler the spec named, when another one does its work
    unreachable: str | None = None    # why no installed compiler can do this step from what is there

    @property
    def node_id(self) -> str:
        return f"compile/{self.id}"


def _compilers(reg: Any) -> dict[str, Any]:
    out = {}
    for entry in reg.entries("compilers"):
        if reg.allowed(entry):
            try:
                out[entry.name] = entry.load()
            except Exception:
                continue
    return out


def _chain(reg: Any, have: set[str], want: tuple[str, ...]) -> list[str] | None:
    """The shortest list of compiler names turning a format in ``have`` into one in ``want``."""
    compilers = _compilers(reg)
    queue: deque[tuple[str, list[str]]] = deque((f, []) for f in sorted(have))
    seen = set(have)
    while queue:
        fmt, path = queue.popleft()
        for name, cls in sorted(compilers.items()):
            if fmt in cls.accepts and cls.produces not in seen:
                if cls.produces in want:
                    return [*path, name]
                seen.add(cls.produces)
                queue.append((cls.produces, [*path, name]))
    return None


def _stand_in(reg: Any, cls: Any, cfg: dict[str, Any], have: set[str], where: str) -> dict[str, Any] | None:
    """The step ``cfg`` done by another compiler making ``cls.produces`` straight from a format in
    ``have`` (its id and options kept), or None when no installed compiler does."""
    for name, other in sorted(_compilers(reg).items()):
        if other is cls or other.produces != cls.produces or not set(other.accepts) & have:
            continue
        defaults = {k: f.default for k, f in cls.Config.model_fields.items()}
        options = {k: v for k, v in cfg.items() if k not in ("name", "id", "input") and v != defaults.get(k, ...)}
        # The stand-in's own defaults apply; options the user set and it has are carried over.
        unknown = sorted(k for k in options if k not in other.Config.model_fields)
        if unknown:
            raise UserError(f"{cls.name} does not take {', '.join(sorted(have))}; {name} makes {cls.produces} from "
                            f"it instead but has no option {', '.join(unknown)}", where=where,
                            hint=f"drop the option, or name {name} with its own options")
        return {"name": name, "id": cfg.get("id") or cfg["name"], **options}
    return None


def plan_steps(spec: Any, reg: Any, wanted: list[dict[str, Any]] | None = None, *, after: list[Step] | None = None,
               inserted_for: str | None = None, where: str = "compile") -> list[Step]:
    """The compile steps of ``spec`` (or of ``wanted`` entries), with inserted ones, in order.

    ``after`` are steps already planned: their artifacts are available to the new ones, and their ids
    are taken. ``wanted`` entries (steps the kernel adds for a deploy target, named by ``inserted_for``)
    get ids that collide with no other step's. ``where`` prefixes key paths in error messages.
    """
    fw = reg.get("frameworks", spec["framework"]["name"], where="framework.name")
    formats: dict[str, str] = {EXPORT: fw.export_format}
    steps: list[Step] = []
    taken = set()

    def unique(name: str) -> str:
        step_id, n = name, 1
        while step_id in taken:
            n += 1
            step_id = f"{name}{n}"
        taken.add(step_id)
        return step_id

    for cfg in spec["compile"]:
        taken.add(cfg.get("id") or cfg["name"])
    for earlier in after or []:
        taken.add(earlier.id)
        if not earlier.unreachable:
            formats[earlier.node_id] = earlier.produces
    for i, cfg in enumerate(wanted if wanted is not None else spec["compile"]):
        here = f"{where}[{i}]"
        cls = reg.get("compilers", cfg["name"], where=f"{here}.name")
        if cfg.get("input"):
            source = f"compile/{cfg['input']}" if cfg["input"] != EXPORT else EXPORT
            if source not in formats:
                raise UserError(f"input '{cfg['input']}' is not an earlier step", where=f"{here}.input",
                                choices=[EXPORT, *(s.id for s in steps)], got=cfg["input"])
            if formats[source] not in cls.accepts:
                raise UserError(f"'{cfg['input']}' makes {formats[source]}, but {cls.name} accepts "
                                f"{', '.join(cls.accepts)}", where=f"{here}.input")
        else:
            source = next((n for n in reversed(formats) if formats[n] in cls.accepts), "")
            if not source:
                have = set(formats.values())
                chain = _chain(reg, have, cls.accepts)
                standin = _stand_in(reg, cls, cfg, have, here) if chain is None else None
                if chain is None and standin is not None:
                    named, cls = cls.name, reg.get("compilers", standin["name"], where=f"{here}.name")
                    source = next(n for n in reversed(formats) if formats[n] in cls.accepts)
                    step = Step(standin["id"], standin, source, cls.produces, formats[source],
                                inserted_for=inserted_for, stands_in_for=named)
                    taken.add(step.id)
                    steps.append(step)
                    formats[step.node_id] = step.produces
                    continue
                if chain is None:
                    why = (f"{cls.name} needs {' or '.join(cls.accepts)}, and no installed compiler makes that "
                           f"from {', '.join(sorted(have))} (the {fw.name} framework's artifacts)")
                    step = Step(cfg.get("id") or cfg["name"], cfg, EXPORT, cls.produces, formats[EXPORT],
                                inserted_for=inserted_for, unreachable=why)
                    taken.add(step.id)
                    steps.append(step)  # its format is never there: later steps take theirs elsewhere
                    continue
                for name in chain:
                    helper = reg.get("compilers", name, where=here)
                    src = next(n for n in reversed(formats) if formats[n] in helper.accepts)
                    step = Step(unique(name), {"name": name}, src, helper.produces, formats[src],
                                inserted_for=inserted_for or cls.name, needs=cls.accepts)
                    steps.append(step)
                    formats[step.node_id] = step.produces
                source = next(n for n in reversed(formats) if formats[n] in cls.accepts)
        step_id = cfg.get("id") or cfg["name"]
        if wanted is not None and inserted_for is not None:
            step_id = unique(step_id)
        taken.add(step_id)
        step = Step(step_id, cfg, source, cls.produces, formats[source], inserted_for=inserted_for)
        steps.append(step)
        formats[step.node_id] = step.produces
    return steps


def chain_to(spec: Any, reg: Any, steps: list[Step], want: tuple[str, ...]) -> list[str] | None:
    """The shortest list of compiler names making a format of ``want`` from the export or ``steps``."""
    fw = reg.get("frameworks", spec["framework"]["name"], where="framework.name")
    return _chain(reg, {fw.export_format, *(s.produces for s in steps if not s.unreachable)}, want)


def _report(ctx: Any, node_id: str, line: str) -> None:
    from rich.markup import escape

    ctx.say(f"[dim]{node_id}: {escape(line)}[/]")


def run(node: Node, ctx: Any) -> dict[str, Any]:
    if node.config.get("unreachable"):
        raise Unavailable(node.config["unreachable"])
    step = node.config["step"]
    cls = ctx.registry.get("compilers", step["name"], where="compile.name")
    reason = cls.unavailable_reason()
    if reason:  # the other artifacts can still be made and checked
        raise Unavailable(reason)
    compiler: Compiler = cls(validate_section(cls.Config, step, f"compile '{node.id}'"))
    source_node = node.config["input"]
    work = Path(tempfile.mkdtemp(prefix="mlk-compile-"))
    try:
        source = fetch_artifact(ctx, ctx.outputs[source_node], work / "source")
        splits = best_trial_context(ctx).load_data() if ctx.spec["data"] is not None else None
        threads = ctx.spec["validate"]["threads"]
        inputs = CompileInputs(
            calibration=splits.train[0][:512] if splits is not None else None, data=splits, threads=threads,
            seed=derive_seed(ctx.spec["seed"], node.id), context=best_trial_context(ctx),
            report=lambda line: _report(ctx, node.id, line))
        out = work / "out"
        out.mkdir()
        artifact = compiler.compile(source, out, inputs)
        outputs = store_artifact(ctx, node.id, artifact)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ctx.say(f"{node.id}: {source.format} -> {artifact.format} ({outputs['size_bytes'] / 1e6:.2f} MB)")
    return outputs
