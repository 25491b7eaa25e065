"""``validate/<id>`` nodes: prove an artifact still computes what the trained model computes.

On the held-out split (``validate.split``) the artifact's accuracy is compared with the exported
model's (the reference), outputs are compared on fixed inputs, and latency (p50/p99 at each of
``validate.batch_sizes``, with ``validate.threads`` threads), throughput, size on disk and peak
memory are measured. Each runtime runs in a fresh process, so its peak memory is its own and a
crashing runtime cannot take the run down. The reference is measured once per exported model,
data and settings in a driver process and shared by the run's validate nodes (one process less per
node after the first). The spec's gates fail the node with a report naming the gate and the margin;
the run goes on with the other artifacts and fails at the end.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from mlk.compiler import Unavailable
from mlk.errors import MlkError
from mlk.graph import Node
from mlk.stages.artifacts import best_trial_context, fetch_artifact


class GateFailed(MlkError):
    """An artifact missed a ``validate:`` gate; carries the full report."""

    def __init__(self, node_id: str, failures: list[str], report: dict[str, Any]) -> None:
        self.report = report
        super().__init__(f"{node_id} failed its gates: " + "; ".join(failures))


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the process image (reset by exec);
    ru_maxrss is not on Linux, where a spawned child starts with its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _runner(kind: str, name: str, folder: str, threads: int) -> Any:
    from mlk.compiler import Artifact
    from mlk.registry import registry

    group = "frameworks" if kind == "framework" else "compilers"
    cls = registry().get(group, name, where=f"{group}.{name}")
    artifact = Artifact.load(Path(folder))
    plugin = cls(cls.Config.model_validate({"name": name}))  # running needs only the artifact's own facts
    return plugin.runner(artifact, threads)


def _batches(run: Any, x: Any, size: int) -> Any:
    import numpy as np

    return np.concatenate([run(x[i:i + size]) for i in range(0, len(x), size)])


def measure(kind: str, name: str, folder: str, x: Any, compare: int, threads: int, batch_sizes: list[int],
            warmup: int, repeats: int, timing: bool) -> dict[str, Any]:
    """In a fresh process: outputs on ``x`` and, when ``timing``, latency and peak memory."""
    import numpy as np

    before = _peak_rss_mb()
    try:
        run = _runner(kind, name, folder, threads)
    except Unavailable as e:
        return {"unavailable": str(e)}
    outputs = _batches(run, x, 256)
    result: dict[str, Any] = {"outputs": outputs, "compare": outputs[:compare]}
    if timing:
        latency = {}
        for b in batch_sizes:
            batch = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])), dtype=np.float32)
            for _ in range(warmup):
                run(batch)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run(batch)
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            latency[str(b)] = {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
                               "throughput_per_s": b * 1000.0 / float(np.mean(times))}
        result["latency"] = latency
    peak = _peak_rss_mb()
    result["peak_rss_mb"] = peak
    result["model_rss_mb"] = peak - before
    return result


def in_child(*args: Any) -> dict[str, Any]:
    """:func:`measure` in a fresh (spawned) process."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


#: Measurements of the run's exported model by :func:`measure_export`'s key: a run's validate nodes
#: compare against the same export, and its deploy nodes take the same drift reference.
_EXPORT_MEASUREMENTS: dict[str, dict[str, Any]] = {}


def measure_export(ctx: Any, inputs: str, work: Path, x: Any, *settings: Any) -> dict[str, Any]:
    """:func:`in_child` on the run's exported model with ``x`` (named by ``inputs``, e.g. the split)
    and ``settings`` (``compare, threads, batch_sizes, warmup, repeats, timing``), measured once per
    driver process for the same export (its checksums), data, framework, inputs and settings."""
    framework = ctx.spec["framework"]["name"]
    key = json.dumps([ctx.outputs["export"]["manifest"], ctx.spec["data"], framework, inputs, settings],
                     sort_keys=True, default=str)
    if key not in _EXPORT_MEASUREMENTS:
        export = fetch_artifact(ctx, ctx.outputs["export"], work / "reference")
        if len(_EXPORT_MEASUREMENTS) >= 4:
            _EXPORT_MEASUREMENTS.clear()
        _EXPORT_MEASUREMENTS[key] = in_child("framework", framework, str(export.path), x, *settings)
    return _EXPORT_MEASUREMENTS[key]


def _accuracy(logits: Any, y: Any) -> float:
    return float((logits.argmax(axis=1) == y).mean())


def run(node: Node, ctx: Any) -> dict[str, Any]:
    import numpy as np

    cfg = ctx.spec["validate"]
    splits = best_trial_context(ctx).load_data()
    x, y = getattr(splits, cfg["split"])
    x = np.ascontiguousarray(x, dtype=np.float32)
    work = Path(tempfile.mkdtemp(prefix="mlk-validate-"))
    try:
        art_out = ctx.outputs[node.config["artifact"]]
        art = fetch_artifact(ctx, art_out, work / "artifact")
        settings = (cfg["compare_inputs"], cfg["threads"], cfg["batch_sizes"], cfg["warmup"], cfg["repeats"], True)
        ref = measure_export(ctx, f"split {cfg['split']}", work, x, *settings)
        got = in_child("compiler", node.config["compiler"], str(art.path), x, *settings)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "unavailable" in got:
        raise Unavailable(got["unavailable"])
    ref_acc, acc = _accuracy(ref["outputs"], y), _accuracy(got["outputs"], y)
    report = {
        "artifact": node.config["artifact"], "format": art_out["format"], "steps": art_out["meta"].get("steps", []),
        "split": cfg["split"], "examples": len(y), "reference_accuracy": ref_acc, "accuracy": acc,
        "accuracy_drop": ref_acc - acc,
        "top1_agreement": float((ref["outputs"].argmax(1) == got["outputs"].argmax(1)).mean()),
        "max_output_diff": float(np.abs(ref["compare"] - got["compare"]).max()),
        "latency": got["latency"], "reference_latency": ref["latency"], "threads": cfg["threads"],
        "size_bytes": art_out["size_bytes"], "reference_size_bytes": ctx.outputs["export"]["size_bytes"],
        "peak_rss_mb": got["peak_rss_mb"], "model_rss_mb": got["model_rss_mb"],
    }
    failures = gate_failures(report, cfg)
    report["gates"] = {"passed": not failures, "failures": failures}
    b1 = report["latency"].get("1", {})
    ctx.say(f"{node.id}: accuracy {acc:.4f} ({(acc - ref_acc) * 100:+.2f} pts), max diff "
            f"{report['max_output_diff']:.2e}, p50@1 {b1.get('p50_ms', float('nan')):.3f} ms, "
            f"{report['size_bytes'] / 1e6:.2f} MB" + (f" [red]FAILED: {'; '.join(failures)}[/]" if failures else ""))
    if failures:
        raise GateFailed(node.id, failures, report)
    return report


def gate_failures(report: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Each gate of ``validate:`` the report misses, with the margin."""
    out = []
    if cfg.get("max_metric_drop") is not None and report["accuracy_drop"] > cfg["max_metric_drop"]:
        over = (report["accuracy_drop"] - cfg["max_metric_drop"]) * 100
        out.append(f"max_metric_drop: accuracy dropped {report['accuracy_drop'] * 100:.2f} points, gate "
                   f"{cfg['max_metric_drop'] * 100:.2f} (over by {over:.2f})")
    p99 = report["latency"].get("1", {}).get("p99_ms")
    if cfg.get("max_latency_ms") is not None and p99 is not None and p99 > cfg["max_latency_ms"]:
        out.append(f"max_latency_ms: p99 at batch 1 is {p99:.3f} ms, gate {cfg['max_latency_ms']} ms "
                   f"(over by {p99 - cfg['max_latency_ms']:.3f})")
    if cfg.get("max_output_diff") is not None and report["max_output_diff"] > cfg["max_output_diff"]:
        out.append(f"max_output_diff: {report['max_output_diff']:.3g}, gate {cfg['max_output_diff']:.3g}")
    size_mb = report["size_bytes"] / 1e6
    if cfg.get("max_size_mb") is not None and size_mb > cfg["max_size_mb"]:
        out.append(f"max_size_mb: {size_mb:.3f} MB, gate {cfg['max_size_mb']} MB (over by "
                   f"{size_mb - cfg['max_size_mb']:.3f})")
    return out
