"""Compile benchmark of issue 4: batch-1 and batch-32 latency on 2 threads of every mlk compiler's
artifact, side by side with PyTorch eager, on the digits MLP, the CIFAR CNN and ResNet-18.

    python -m benchmarks.compile.run            # the real run (see RESULTS.md for its duration)
    python -m benchmarks.compile.run --quick    # smoke sizes: digits MLP only, few repetitions

For each model: train it briefly (:mod:`benchmarks.compile.models`), compile it into every variant
through mlk's compiler classes (:mod:`benchmarks.compile.variants`), measure each variant's
accuracy on the held-out split against eager's, then its latency at batch 1 and batch 32,
interleaved (:mod:`benchmarks.compile.timing`). Goals of the issue:

- ONNX Runtime fp32 p50 <= 0.8x eager;
- TVM p50 <= 1.0x ONNX Runtime fp32 (tuned within 30 minutes, or untuned if that already holds);
- int8 (the faster of static per-channel and per-tensor) p50 <= 0.65x fp32 on ResNet-18 and <= 0.8x on
  the CIFAR CNN, losing at most 1 point of accuracy (the digits MLP is reported, not judged);
- batch-norm folding and pruning report their own latency and size changes.

Progress goes to stderr, markdown tables to stdout, everything measured to
``benchmarks/compile/results.json`` (rewritten after each model, so a partial run leaves its part).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.compile import models as md
from benchmarks.compile import timing
from benchmarks.compile import variants as vr

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
BATCHES = (1, 32)
ORT_VS_EAGER = 0.8
TVM_VS_ORT = 1.0
INT8_VS_FP32 = {"resnet18": 0.65, "cifar_cnn": 0.8}
INT8_MAX_ACCURACY_LOSS = 1.0  # points
INT8 = ("ort_int8_static_pc", "ort_int8_static_pt")
#: --quick: training steps, timed and warm-up calls, timing rounds and settle pause for the digits MLP
QUICK: dict[str, Any] = {"steps": 51, "repeats": 20, "warmup": 3, "prune_epochs": 1, "rounds": 5, "settle_s": 0.01}


def say(message: str) -> None:
    print(f"[compile-bench] {message}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# -- accuracy --------------------------------------------------------------------------------------------


def accuracy(built: Sequence[vr.Variant], x: Any, y: Any, chunk: int = 32) -> dict[str, dict[str, Any]]:
    """Each variant's top-1 accuracy on ``(x, y)``, its agreement with eager's predictions and the largest
    absolute difference of its logits from eager's (the first variant is eager)."""
    import numpy as np

    logits = {}
    for v in built:
        t0 = time.perf_counter()
        parts = [np.asarray(v.run(np.ascontiguousarray(x[i:i + chunk]))) for i in range(0, len(x), chunk)]
        logits[v.key] = (np.concatenate(parts), time.perf_counter() - t0)
    reference = logits[built[0].key][0]
    out = {}
    for key, (z, seconds) in logits.items():
        pred = z.argmax(axis=1)
        out[key] = {"accuracy": float((pred == y).mean()),
                    "agreement_with_eager": float((pred == reference.argmax(1)).mean()),
                    "max_abs_logit_diff": float(np.abs(z - reference).max()), "examples": len(y), "seconds": seconds}
    return out


# -- one model ---------------------------------------------------------------------------------------------


def _train_cached(spec: md.ModelSpec, steps: int | None, cache: Path | None) -> dict[str, Any]:
    """:func:`models.train`, or its weights and facts from ``cache`` when an earlier run left them there."""
    import torch

    from mlk.registry import registry
    from mlk.trial import build_model

    name = f"{spec.key}-{steps if steps is not None else spec.steps}"
    if cache is not None and (cache / f"{name}.pt").is_file():
        splits = md.load_splits(spec.images)
        module = build_model(registry(), dict(spec.section), "torch", splits.meta)
        module.load_state_dict(torch.load(cache / f"{name}.pt"))
        facts = json.loads((cache / f"{name}.json").read_text())
        meta = {k: splits.meta[k] for k in ("input_shape", "num_classes", "layout", "classes") if k in splits.meta}
        return {"module": module.eval(), "splits": splits, "meta": meta, "training": {**facts, "cached": True}}
    trained = md.train(spec, threads=vr.THREADS, steps=steps)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(trained["module"].state_dict(), cache / f"{name}.pt")
        (cache / f"{name}.json").write_text(json.dumps(trained["training"]))
    return trained


def bench_model(key: str, work: Path, *, quick: bool = False, cache: Path | None = None,
                only: tuple[str, ...] = vr.DEFAULT, tuning_trials: int = 64, tuning_budget_s: float = 1800.0,
                quiet_wait_s: float = 0.0) -> dict[str, Any]:
    """Train, compile, check and time one model; everything as a JSON-able dict."""
    import torch

    spec = md.MODELS[key]
    steps = QUICK["steps"] if quick else None
    repeats = QUICK["repeats"] if quick else spec.repeats
    warmup = QUICK["warmup"] if quick else spec.warmup
    prune_epochs = QUICK["prune_epochs"] if quick else spec.prune_epochs
    result: dict[str, Any] = {"model": key, "section": spec.section}

    say(f"{key}: training")
    result["training"] = {"loadavg_before": loadavg()}
    trained = _train_cached(spec, steps, cache)
    result["training"].update(trained["training"], loadavg_after=loadavg())
    result["data"] = {"input_shape": trained["meta"]["input_shape"], "proxy": trained["splits"].meta.get("proxy"),
                      "sizes": trained["splits"].sizes()}
    say(f"{key}: test accuracy {trained['training']['test']['accuracy']:.4f} after "
        f"{trained['training']['steps']} steps ({trained['training']['seconds']:.0f} s)")

    say(f"{key}: compiling")
    built = vr.build_variants(trained, dict(spec.section), work / key, prune_epochs=prune_epochs, only=only,
                              tuning_trials=tuning_trials, tuning_budget_s=tuning_budget_s, log=say)
    torch.set_num_threads(vr.THREADS)  # passes set it too; keep eager on 2 threads whatever ran last
    result["unavailable"] = built.unavailable
    result["errors"] = built.errors
    result["variants"] = {v.key: {"label": v.label, "file": v.file.name, "size_bytes": v.size_bytes,
                                  "compile_s": v.compile_s, "steps": v.steps, **v.facts} for v in built.variants}

    say(f"{key}: accuracy of every variant on {len(trained['splits'].test[1])} held-out examples")
    result["accuracy"] = {"loadavg_before": loadavg(),
                          "variants": accuracy(built.variants, *trained["splits"].test), "loadavg_after": loadavg()}

    result["latency"] = {}
    runners = {v.key: v.run for v in built.variants}
    for batch in BATCHES:
        x = trained["splits"].test[0][:batch].copy()
        quiet = timing.wait_for_quiet(quiet_wait_s) if quiet_wait_s > 0 else None
        if quiet is not None and not quiet["quiet"]:
            say(f"{key}: other processes still keep {quiet['other_cores']:.1f} cores busy after "
                f"{quiet['waited_s']:.0f} s; measuring anyway (interleaved, so all variants share it)")
        say(f"{key}: timing batch {batch} ({repeats} calls per variant at most, interleaved)")
        result["latency"][str(batch)] = timing.measure(runners, x, repeats=repeats, warmup=warmup,
                                                       budget_s=5.0 if quick else 90.0,
                                                       min_repeats=5 if quick else 10,
                                                       rounds=QUICK["rounds"] if quick else 25,
                                                       settle_s=QUICK["settle_s"] if quick else 0.1)
        result["latency"][str(batch)]["wait_for_quiet"] = quiet
        for k, s in result["latency"][str(batch)]["variants"].items():
            say(f"  {k:20s} p50 {s['p50_ms']:10.3f} ms  p99 {s['p99_ms']:10.3f} ms  n {s['n']}")
    result["rows"] = {str(b): rows(result, b) for b in BATCHES}
    result["goals"] = goals(result)
    del built, runners, trained
    gc.collect()
    return result


# -- tables and goals -----------------------------------------------------------------------------------------


def rows(result: dict[str, Any], batch: int) -> list[dict[str, Any]]:
    """One row per variant at ``batch``: latency, ratios to eager and to ORT fp32, accuracy, size."""
    lat = result["latency"][str(batch)]["variants"]
    acc = result["accuracy"]["variants"]
    eager = lat["eager"]["p50_ms"]
    ort = lat["ort_fp32"]["p50_ms"] if "ort_fp32" in lat else None
    out = []
    for key, s in lat.items():
        v = result["variants"][key]
        out.append({"variant": key, "label": v["label"], "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "n": s["n"],
                    "vs_eager": s["p50_ms"] / eager, "vs_ort_fp32": s["p50_ms"] / ort if ort else None,
                    "accuracy": acc[key]["accuracy"],
                    "accuracy_delta_points": 100.0 * (acc[key]["accuracy"] - acc["eager"]["accuracy"]),
                    "agreement_with_eager": acc[key]["agreement_with_eager"], "size_bytes": v["size_bytes"],
                    "size_vs_eager": v["size_bytes"] / result["variants"]["eager"]["size_bytes"],
                    "cpu_per_wall": s["cpu_per_wall"]})
    return out


def _check(name: str, value: float | None, limit: float | None, extra: str = "") -> dict[str, Any]:
    if value is None:
        return {"goal": name, "value": None, "limit": limit, "met": None, "note": extra or "not measured"}
    met = None if limit is None else value <= limit
    return {"goal": name, "value": value, "limit": limit, "met": met, "note": extra}


def int8_choice(result: dict[str, Any], batch: int) -> str | None:
    """The faster (p50) of the static int8 variants at ``batch``."""
    lat = result["latency"][str(batch)]["variants"]
    found = [k for k in INT8 if k in lat]
    return min(found, key=lambda k: lat[k]["p50_ms"]) if found else None


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals at each batch size, judged on p50."""
    out = []
    model = result["model"]
    acc = result["accuracy"]["variants"]
    for batch in BATCHES:
        lat = result["latency"][str(batch)]["variants"]
        p50 = {k: s["p50_ms"] for k, s in lat.items()}
        ort = p50.get("ort_fp32")
        where = f"{model}, batch {batch}"
        out.append({**_check("ORT fp32 p50 <= 0.8x eager", ort / p50["eager"] if ort else None, ORT_VS_EAGER),
                    "where": where, "batch": batch})
        # the plain tuned library when it was built, else the prepacked one
        candidates = [k for k, b in {**vr.TUNED, **vr.PREPACKED}.items() if b == batch]
        tuned = next((k for k in candidates if k in p50), candidates[0] if candidates else None)
        if tuned in p50:
            key = tuned
            t = result["variants"][tuned].get("tuning") or {}
            note = (f"{tuned}: {t.get('trials_measured')} trials measured, {t.get('tasks_tuned')}/{t.get('tasks')} "
                    f"operators tuned ({len(t.get('tasks_applied') or [])} built tuned) in "
                    f"{t.get('tuning_seconds', 0):.0f} s")
        else:
            key = "tvm"
            why = result["unavailable"].get(tuned or "", result["errors"].get(tuned or ""))
            note = "default schedules: " + ("tuning unavailable" if why else "tuning not tried")
        tvm = p50.get(key)
        out.append({**_check("TVM p50 <= 1.0x ORT fp32", tvm / ort if tvm and ort else None, TVM_VS_ORT, note),
                    "where": where, "batch": batch, "variant": key})
        choice = int8_choice(result, batch)
        if choice and ort:
            loss = 100.0 * (acc["ort_fp32"]["accuracy"] - acc[choice]["accuracy"])
            limit = INT8_VS_FP32.get(model)
            check = _check(f"int8 p50 <= {limit}x ORT fp32, <= 1 point lost" if limit else
                           "int8 p50 vs ORT fp32 (reported, no goal)", p50[choice] / ort, limit,
                           f"{choice}; {loss:+.2f} points lost vs ORT fp32")
            check["accuracy_loss_points"] = loss
            if limit is not None:
                check["met"] = bool(check["met"] and loss <= INT8_MAX_ACCURACY_LOSS)
            out.append({**check, "where": where, "batch": batch, "variant": choice})
    return out


def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown_rows(table: list[dict[str, Any]]) -> str:
    lines = ["| variant | p50 ms | p99 ms | n | vs eager | vs ORT fp32 | accuracy | Δ vs eager | agree | size MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['label']} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} | {r['n']} | {_ratio(r['vs_eager'])} "
                     f"| {_ratio(r['vs_ort_fp32'])} | {100 * r['accuracy']:.2f}% | {r['accuracy_delta_points']:+.2f} "
                     f"| {100 * r['agreement_with_eager']:.1f}% | {r['size_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def markdown_goals(checks: list[dict[str, Any]]) -> str:
    lines = ["| where | goal | value | met? | note |", "|---|---|---|---|---|"]
    for c in checks:
        met = "report only" if c["limit"] is None else {True: "met", False: "**missed**", None: "-"}[c["met"]]
        lines.append(f"| {c['where']} | {c['goal']} | {_ratio(c['value'])} | {met} | {c['note']} |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    parts = []
    for key, result in results["models"].items():
        for batch in BATCHES:
            parts.append(f"### {key}, batch {batch}\n\n{markdown_rows(result['rows'][str(batch)])}\n")
    checks = [c for r in results["models"].values() for c in r["goals"]]
    parts.append(f"### Goals\n\n{markdown_goals(checks)}\n")
    return "\n".join(parts)


# -- the run ---------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for dist in ("torch", "onnx", "onnxscript", "onnxruntime", "apache-tvm", "apache-tvm-ffi", "numpy",
                 "scikit-learn"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cores": os.cpu_count(), "cpu": cpu, "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions, "commit": commit, "threads": vr.THREADS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits MLP only, briefly trained, few repetitions")
    parser.add_argument("--models", nargs="+", choices=list(md.MODELS), help="models to run (default: all; "
                                                                              "--quick: digits_mlp)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the results (JSON)")
    parser.add_argument("--work", type=Path, help="keep the artifacts in this folder (default: a temporary one)")
    parser.add_argument("--cache", type=Path, help="reuse trained weights from (and save them to) this folder")
    parser.add_argument("--tuning-trials", type=int, default=512,
                        help="MetaSchedule trials of each tuned TVM variant (0: no tuned variants)")
    parser.add_argument("--tuning-budget", type=float, default=1800.0, metavar="S",
                        help="wall-clock limit of each TVM tuning, seconds (default 1800: the issue's 30 minutes)")
    parser.add_argument("--quiet-wait", type=float, default=None, metavar="S",
                        help="before each timing, wait up to S seconds for other processes to leave the CPU "
                             "(under 0.5 cores busy; default 300, --quick 0)")
    parser.add_argument("--variants", nargs="+", choices=[k for k in vr.ALL if k != "eager"], default=None,
                        help="compile and time only these variants, beside eager (default: all but the "
                             "prepacked TVM ones)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other models already in --output; replace only the models run now")
    args = parser.parse_args(argv)
    keys = args.models or (["digits_mlp"] if args.quick else list(md.MODELS))
    only = vr.DEFAULT if args.variants is None else ("eager", *args.variants)
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 300.0)
    started = time.perf_counter()
    results: dict[str, Any] = {"quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "command": " ".join(["python -m benchmarks.compile.run", *(argv or sys.argv[1:])]),
                               "machine": machine(), "loadavg_start": loadavg(), "models": {}}
    if args.merge and args.output.exists():  # the models not run now stay as they were, with their own dates
        earlier = json.loads(args.output.read_text())
        results["models"] = {k: {"date": earlier.get("date"), "command": earlier.get("command"), **v}
                             for k, v in earlier.get("models", {}).items() if k not in keys}
    work = args.work or Path(tempfile.mkdtemp(prefix="mlk-compile-bench-"))
    try:
        for key in keys:
            t0 = time.perf_counter()
            results["models"][key] = bench_model(key, work, quick=args.quick, cache=args.cache,
                                                 only=only, tuning_trials=args.tuning_trials,
                                                 tuning_budget_s=args.tuning_budget, quiet_wait_s=quiet_wait)
            results["models"][key].update(seconds=time.perf_counter() - t0, date=results["date"],
                                          command=results["command"])
            results["seconds"] = time.perf_counter() - started
            args.output.write_text(json.dumps(results, indent=1))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["loadavg_end"] = loadavg()
    results["seconds"] = time.perf_counter() - started
    args.output.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    say(f"done in {results['seconds']:.0f} s; results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
