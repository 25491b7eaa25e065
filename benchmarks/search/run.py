"""Search benchmarks of issue 3, side by side with Optuna and Ray Tune, in one run.

    python -m benchmarks.search.run            # the real run (see RESULTS.md for its duration)
    python -m benchmarks.search.run --quick    # a smoke test: few seeds, part of the table

1. **Digits replay**: every method replayed on the recorded learning curves
   (``data/digits_curves.npz``, made once by ``python -m benchmarks.search.curves``) up to a budget
   of 64 x 81 = 5184 epochs (random search's 64 full trainings), for each seed. Measured: epochs
   each method needs to reach random search's final best (the median over seeds of random's best
   after 5184 epochs), and anytime regret at several budgets. Run twice: searched and judged on
   val_loss (``digits``), and on the classification error 1 - val_accuracy (``digits_error``), the
   "validation error" of the Hyperband and ASHA papers.
2. **Hartmann-6** with a fidelity parameter (good and poor correlation): final regret at equal
   budget (5184) for every method, and for the poor variant the epochs mlk's hyperband and asha
   need to reach random search's final quality, relative to random search's own (runs of the mlk
   methods continue to 6 x 5184 epochs, or until they reach it).
3. **Conformance**: mlk's hyperband (one whole iteration) and asha (ask by ask) checked against the
   papers' rules on the table.
4. **Live**: real ``mlk run`` of digits_hb, digits_asha and digits_hb with R = 81, broken down into
   pure training time and everything else (:mod:`benchmarks.search.live`).

Progress goes to stderr; markdown tables go to stdout and everything measured to
``benchmarks/search/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.search import replay as rp

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"

R = 81
ETA = 3
S_MAX = 4                      # floor(log_3 81)
RANDOM_TRIALS = 64             # the budget is random search's 64 full trainings
BUDGET = RANDOM_TRIALS * R     # 5184 epochs
BUDGETS = (500, 1000, 2000, BUDGET)
GOAL_SPEEDUP = 5.0             # reach random's final best with at most 1/5 of its epochs
GOAL_POOR_RATIO = S_MAX + 1    # on the poorly correlated function, at most (s_max + 1)x random's epochs
GOAL_OVERHEAD = 0.05
EXTENDED = 6                   # Hartmann runs of the mlk methods go on to EXTENDED x BUDGET epochs
MLK = ("mlk-hyperband", "mlk-asha")
#: The digits replay's parts and the metric each one is searched and judged on.
DIGITS_METRICS = {"digits": "val_loss", "digits_error": "val_error"}
PARTS = (*DIGITS_METRICS, "hartmann", "conformance", "live")
PEERS = ("optuna-tpe", "optuna-random", "ray-asha", "ray-hyperband")


def say(message: str) -> None:
    print(f"[search-bench] {message}", file=sys.stderr, flush=True)


# -- running replays in worker processes ----------------------------------------------------------------

_PROBLEMS: dict[tuple[Any, ...], rp.Problem] = {}


def problem_for(spec: tuple[Any, ...]) -> rp.Problem:
    """A problem from a picklable description: ("digits", rows, table path, metric) or ("hartmann", variant)."""
    if spec not in _PROBLEMS:
        if spec[0] == "digits":
            _PROBLEMS[spec] = rp.CurveTable(rp.load_table(Path(spec[2])), rp.digits_space(), metric=spec[3],
                                            rows=spec[1])
        else:
            _PROBLEMS[spec] = rp.HartmannProblem(spec[1], R)
    return _PROBLEMS[spec]


def _task(args: tuple[tuple[Any, ...], str, int, int, float | None]) -> dict[str, Any]:
    spec, kind, seed, budget, stop_at = args
    t0 = time.perf_counter()
    trace = rp.run_one(problem_for(spec), kind, seed, budget, stop_at=stop_at)
    out = trace.to_dict()
    out["seconds"] = time.perf_counter() - t0
    return out


def run_tasks(tasks: list[tuple[Any, ...]], processes: int, what: str) -> list[dict[str, Any]]:
    """Run replay tasks (in ``processes`` spawned processes when > 1), reporting progress."""
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    if processes <= 1:
        for i, t in enumerate(tasks):
            results.append(_task(t))
            _progress(what, i + 1, len(tasks), started)
        return results
    with ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn")) as pool:
        for i, out in enumerate(pool.map(_task, tasks)):
            results.append(out)
            _progress(what, i + 1, len(tasks), started)
    return results


def _progress(what: str, done: int, total: int, started: float) -> None:
    elapsed = time.perf_counter() - started
    if done == total or done % max(1, total // 10) == 0:
        say(f"{what}: {done}/{total} replays, {elapsed:.0f}s elapsed, ETA {elapsed / done * (total - done):.0f}s")


def group(outs: list[dict[str, Any]]) -> dict[str, list[rp.Trace]]:
    traces: dict[str, list[rp.Trace]] = {}
    for o in outs:
        traces.setdefault(o["label"], []).append(rp.Trace.from_dict({k: v for k, v in o.items() if k != "seconds"}))
    return traces


def cpu_seconds(outs: list[dict[str, Any]]) -> dict[str, float]:
    per: dict[str, float] = {}
    for o in outs:
        per[o["label"]] = per.get(o["label"], 0.0) + o["seconds"]
    return {k: round(v, 2) for k, v in per.items()}


# -- 1. digits replay ------------------------------------------------------------------------------


def bench_digits(seeds: Sequence[int], rows: int | None, processes: int, methods: Sequence[str] = rp.METHODS,
                 table: Path = rp.TABLE, metric: str = "val_loss") -> dict[str, Any]:
    spec = ("digits", rows, str(table), metric)
    problem = problem_for(spec)
    budget = RANDOM_TRIALS * problem.max_resource  # 5184 for the real table
    budgets = (*(b for b in BUDGETS if b < budget), budget)
    say(f"digits replay on {metric}: {len(methods)} methods x {len(seeds)} seeds, budget {budget} epochs, "
        f"{problem.describe()['rows']} table rows")
    outs = run_tasks([(spec, k, s, budget, None) for k in methods for s in seeds], processes, f"digits {metric}")
    traces = group(outs)
    summary = rp.summarize(traces, problem.optimum, budgets, "mlk-random", budget)
    told = rp.summarize(traces, problem.optimum, budgets, "mlk-random", budget, curve="told")
    goals = digits_goals(summary, budget, budgets)
    return {"problem": problem.describe(), "seeds": list(seeds), "budget": budget, "budgets": list(budgets),
            "summary": summary, "goals": goals, "summary_told": told, "goals_told": digits_goals(told, budget, budgets),
            "cpu_seconds": cpu_seconds(outs), "traces": outs}


def digits_goals(summary: dict[str, Any], budget: int, budgets: Sequence[int]) -> dict[str, Any]:
    m = summary["methods"]
    speed = {k: {"epochs_median": m[k]["epochs_to_target"]["median"], "speedup": m[k]["speedup"],
                 "met": m[k]["epochs_to_target"]["median"] <= budget / GOAL_SPEEDUP}
             for k in MLK if k in m}
    anytime: dict[str, Any] = {}
    for k in MLK:
        for peer in PEERS:
            if k not in m or peer not in m:
                continue
            worse = [b for b in map(str, budgets)
                     if m[k]["regret"][b]["median"] > m[peer]["regret"][b]["median"] + 1e-12]
            anytime[f"{k} vs {peer}"] = {"worse_at": worse, "met": not worse}
    return {"speedup": speed, "anytime": anytime,
            "speedup_met": all(v["met"] for v in speed.values()),
            "anytime_met": all(v["met"] for v in anytime.values())}


# -- 2. Hartmann ----------------------------------------------------------------------------------------


def bench_hartmann(seeds: Sequence[int], processes: int, methods: Sequence[str] = rp.METHODS,
                   extended: int = EXTENDED) -> dict[str, Any]:
    from benchmarks.search.hartmann import rank_correlation

    out: dict[str, Any] = {}
    for variant in ("good", "poor"):
        spec = ("hartmann", variant)
        problem = problem_for(spec)
        say(f"hartmann {variant}: {len(methods)} methods x {len(seeds)} seeds, budget {BUDGET}")
        outs = run_tasks([(spec, k, s, BUDGET, None) for k in methods for s in seeds], processes,
                         f"hartmann-{variant}")
        traces = group(outs)
        summary = rp.summarize(traces, problem.optimum, BUDGETS, "mlk-random", BUDGET)
        target = summary["target"]
        # epochs to reach random's final quality, with runs allowed to go on to extended x BUDGET
        ext_kinds = [k for k in ("mlk-random", *MLK) if k in methods]
        say(f"hartmann {variant}: epochs to reach {target:.4f}, runs up to {extended * BUDGET} epochs")
        ext = run_tasks([(spec, k, s, extended * BUDGET, target) for k in ext_kinds for s in seeds], processes,
                        f"hartmann-{variant} extended")
        ext_traces = group(ext)
        reach = {k: rp.quantiles([t.epochs_to(target) for t in ts]) for k, ts in ext_traces.items()}
        reached = {k: sum(math.isfinite(t.epochs_to(target)) for t in ts) for k, ts in ext_traces.items()}
        base = reach.get("mlk-random", {}).get("median", math.nan)
        ratios = {k: reach[k]["median"] / base for k in MLK if k in reach}
        out[variant] = {
            "problem": problem.describe(), "rank_correlation": rank_correlation(variant, max_resource=R),
            "summary": summary, "epochs_to_random_final": reach, "reached": reached,
            "extended_budget": extended * BUDGET,
            "ratio_vs_random": ratios,
            "goal_met": all(r <= GOAL_POOR_RATIO for r in ratios.values()) if variant == "poor" else None,
            "cpu_seconds": cpu_seconds(outs + ext),
            "traces": outs,
        }
    return out


# -- 3. conformance -----------------------------------------------------------------------------------


def bench_conformance(seeds: Sequence[int], rows: int | None, table: Path = rp.TABLE) -> dict[str, Any]:
    problem = problem_for(("digits", rows, str(table), DIGITS_METRICS["digits"]))
    hb = [rp.check_hyperband(problem, s) for s in seeds]
    asha = [rp.check_asha(problem, s, RANDOM_TRIALS * problem.max_resource) for s in seeds]
    return {"hyperband": hb, "asha": asha,
            "hyperband_ok": all(not c["problems"] for c in hb),
            "asha_ok": all(c["problem_count"] == 0 for c in asha)}


# -- 4. live ---------------------------------------------------------------------------------------------


def bench_live(quick: bool) -> dict[str, Any]:
    from benchmarks.search.live import DEFAULT_RUNS, run_live

    runs = [("digits_hb", ("searcher.max_resource=3",))] if quick else list(DEFAULT_RUNS)
    out = []
    for spec, overrides in runs:
        say(f"live: mlk run +spec={spec} {' '.join(overrides)}")
        r = run_live(spec, overrides)
        say(f"live: {spec} {' '.join(overrides)}: search {r['search_wall_s']:.1f}s x {r['workers']} workers, "
            f"pure training {r['pure_training_s']:.1f}s, overhead {100 * r['overhead']:.1f}% "
            f"(steady {100 * r['overhead_steady']:.1f}%, scheduler {100 * r['scheduler_overhead']:.2f}%)")
        out.append(r)
    return {"runs": out, "goal": GOAL_OVERHEAD,
            "met_total": all(r["overhead"] <= GOAL_OVERHEAD for r in out),
            "met_steady": all(r["overhead_steady"] <= GOAL_OVERHEAD for r in out),
            "met_scheduler": all(r["scheduler_overhead"] <= GOAL_OVERHEAD for r in out)}


# -- environment --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("optuna", "ray", "torch", "numpy", "scikit-learn"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"cpus": os.cpu_count(), "cpu": cpu, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=rp.REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# -- tables ---------------------------------------------------------------------------------------------


def _q(q: dict[str, float], fmt: str = "{:.4f}") -> str:
    def f(x: float | str) -> str:
        x = float(x)  # results read back from JSON hold "inf" as a string
        return "never" if math.isinf(x) else fmt.format(x)

    return f"{f(q['median'])} [{f(q['q25'])}, {f(q['q75'])}]"


def _speedup(x: float | str) -> str:
    x = float(x)
    return f"{x:.1f}x" if x > 0 else "< 1x (median seed: not within the budget)"


def _yes(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "**no**")


def _digits_table(d: dict[str, Any], s: dict[str, Any], g: dict[str, Any], view: str) -> list[str]:
    budgets = d["budgets"]
    lines = [f"**Digits table replay** ({view}; {d['problem']['rows']} configurations x "
             f"{d['problem']['max_resource']} epochs, {len(d['seeds'])} seeds, budget {d['budget']} epochs; target = "
             f"random's median final best {d['problem']['metric']} {s['target']:.4f}, "
             f"table optimum {s['optimum']:.4f}). "
             "Median [IQR].", "",
             f"| method | epochs to reach target | reached | speedup vs {d['budget']} | "
             + " | ".join(f"regret @{b}" for b in budgets) + " | configs |",
             "|---|---|---|---|" + "---|" * len(budgets) + "---|"]
    for k, e in s["methods"].items():
        lines.append(f"| {rp.LABELS[k]} | {_q(e['epochs_to_target'], '{:.0f}')} | {e['reached']}/{e['seeds']} | "
                     f"{_speedup(e['speedup'])} | " + " | ".join(_q(e["regret"][str(b)]) for b in budgets)
                     + f" | {e['configurations']['median']:.0f} |")
    lines += ["", "| goal | met? |", "|---|---|"]
    for k, v in g["speedup"].items():
        lines.append(f"| {rp.LABELS[k]} reaches the target with <= {d['budget'] / GOAL_SPEEDUP:.0f} epochs "
                     f"(speedup >= {GOAL_SPEEDUP:.0f}x): {_speedup(v['speedup'])} | {_yes(v['met'])} |")
    for k, v in g["anytime"].items():
        a, b = k.split(" vs ")
        detail = "no worse at every budget" if v["met"] else f"worse at {', '.join(v['worse_at'])}"
        lines.append(f"| anytime regret of {rp.LABELS[a]} <= {rp.LABELS[b]}: {detail} | {_yes(v['met'])} |")
    lines.append("")
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for part in DIGITS_METRICS:
        if part not in results:
            continue
        d = results[part]
        lines += _digits_table(d, d["summary"], d["goals"], "every epoch's report counts, as for `select`")
        lines += _digits_table(d, d["summary_told"], d["goals_told"],
                               "stricter view: only the value at the end of each job counts")
    if "hartmann" in results:
        for variant, h in results["hartmann"].items():
            s = h["summary"]
            corr = ", ".join(f"r={r}: {c:.2f}" for r, c in h["rank_correlation"].items())
            lines += [f"**Hartmann-6, {variant} correlation** (Spearman with r=81: {corr}; {len(s['methods'])} "
                      f"methods; target = random's median final best {s['target']:.4f}). Median [IQR].", "",
                      "| method | regret @5184 | regret @1000 | epochs to reach target (runs up to "
                      f"{h['extended_budget']}) | ratio vs random |", "|---|---|---|---|---|"]
            for k, e in s["methods"].items():
                reach = h["epochs_to_random_final"].get(k)
                ratio = h["ratio_vs_random"].get(k)
                lines.append(f"| {rp.LABELS[k]} | {_q(e['regret'][str(BUDGET)])} | {_q(e['regret']['1000'])} | "
                             + (f"{_q(reach, '{:.0f}')} ({h['reached'][k]}/{e['seeds']})" if reach else "-")
                             + " | " + (f"{float(ratio):.2f}" if ratio is not None else "-") + " |")
            if variant == "poor":
                lines += ["", f"Goal: hyperband and asha need at most {GOAL_POOR_RATIO}x random's epochs: "
                          f"{_yes(h['goal_met'])}"]
            lines.append("")
    if "conformance" in results:
        c = results["conformance"]
        lines += [f"**Conformance with the papers** (table): hyperband {len(c['hyperband'])} full iterations "
                  f"{'match' if c['hyperband_ok'] else 'DO NOT match'} Li et al. 2018 (bracket sizes, rung "
                  f"resources, best-k continued); asha {sum(a['asks'] for a in c['asha'])} asks checked, "
                  f"{sum(a['problem_count'] for a in c['asha'])} deviations from Li et al. 2020.", ""]
    if "live" in results:
        lv = results["live"]
        lines += ["**Live runs** (real training, 2 workers).", "",
                  "| run | search wall | W x k | pure training | report + ckpt | setup | warm-up | dispatch gaps | "
                  "tail idle | overhead | steady | scheduler | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in lv["runs"]:
            name = r["spec"] + ("".join(f" {o}" for o in r["overrides"]))
            lines.append(f"| {name} ({r['epochs']} epochs, {r['requests']} requests) | {r['search_wall_s']:.1f}s | "
                         f"{r['capacity_s']:.1f}s | {r['pure_training_s']:.1f}s | {r['report_checkpoint_s']:.1f}s | "
                         f"{r['setup_restore_s']:.1f}s | {r['worker_warmup_s']:.1f}s | {r['dispatch_gaps_s']:.2f}s | "
                         f"{r['tail_idle_s']:.1f}s | {100 * r['overhead']:.0f}% | {100 * r['overhead_steady']:.0f}% | "
                         f"{100 * r['scheduler_overhead']:.1f}% | {r['load_average']['before'][0]:.1f}-"
                         f"{r['load_average']['after'][0]:.1f} |")
        lines += ["", f"Goal <= {100 * lv['goal']:.0f}%: total {_yes(lv['met_total'])}, steady "
                  f"{_yes(lv['met_steady'])}, scheduler only {_yes(lv['met_scheduler'])}", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few seeds, part of the table: a smoke test")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 25; --quick 2)")
    p.add_argument("--rows", type=int, default=None, help="use only the first ROWS table rows (--quick 300)")
    p.add_argument("--processes", type=int, default=2, help="replay processes (default 2)")
    p.add_argument("--only", nargs="+", choices=PARTS,
                   help="run only these parts (digits: searched and judged on val_loss; digits_error: on the "
                        "classification error 1 - val_accuracy)")
    p.add_argument("--methods", nargs="+", choices=rp.METHODS, default=list(rp.METHODS))
    p.add_argument("--table", type=Path, default=rp.TABLE, help=f"the learning-curve table (default {rp.TABLE})")
    p.add_argument("--output", type=Path, default=RESULTS, help=f"where to write the JSON (default {RESULTS})")
    p.add_argument("--merge", action="store_true",
                   help="with --only: replace only those parts of an existing --output file")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="only print the tables of an existing --output file")
    args = p.parse_args(argv)
    if args.print_only:
        print(markdown(json.loads(args.output.read_text())))
        return 0
    quick = args.quick
    seeds = list(range(args.seeds if args.seeds is not None else (2 if quick else 25)))
    rows = args.rows if args.rows is not None else (300 if quick else None)
    only = set(args.only or PARTS)
    results: dict[str, Any] = {
        "command": "python -m benchmarks.search.run" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commit": git_commit(), "quick": quick,
        "machine": machine(), "load_average": {"start": os.getloadavg()}, "seconds": {},
    }
    started = time.perf_counter()
    for part, metric in DIGITS_METRICS.items():
        if part in only:
            t0 = time.perf_counter()
            results[part] = bench_digits(seeds, rows, args.processes, args.methods, args.table, metric)
            results["seconds"][part] = time.perf_counter() - t0
    if "hartmann" in only:
        t0 = time.perf_counter()
        results["hartmann"] = bench_hartmann(seeds, args.processes, args.methods, 2 if quick else EXTENDED)
        results["seconds"]["hartmann"] = time.perf_counter() - t0
    if "conformance" in only:
        t0 = time.perf_counter()
        results["conformance"] = bench_conformance(seeds[:3], rows, args.table)
        results["seconds"]["conformance"] = time.perf_counter() - t0
    if "live" in only:
        t0 = time.perf_counter()
        results["live"] = bench_live(quick)
        results["seconds"]["live"] = time.perf_counter() - t0
    results["load_average"]["end"] = os.getloadavg()
    results["seconds"]["total"] = total = time.perf_counter() - started
    if args.merge and args.output.exists():  # keep the parts not run now from the earlier file
        earlier = json.loads(args.output.read_text())
        parts = {k: results[k] for k in PARTS if k in results}
        results = {**earlier, **parts, "reruns": [*earlier.get("reruns", []), {
            k: results[k] for k in ("command", "date", "commit", "load_average", "seconds")}]}
    args.output.write_text(json.dumps(finite(results), indent=1, default=_json_default) + "\n")
    say(f"done in {total:.0f}s; wrote {args.output}")
    print(markdown(results))
    return 0


def finite(o: Any) -> Any:
    """``o`` with every infinite or NaN float written as the string "inf", "-inf" or "nan" (strict JSON)."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
