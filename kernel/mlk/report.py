"""What ``mlk runs list``, ``mlk runs show`` and the end of ``mlk run`` print."""

from __future__ import annotations

import json
import time
from typing import Any

from mlk.store import RunStore


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def search_run_id(store: RunStore, run_id: str) -> str:
    """The run whose trials this run's search used (itself, or the run it reused the search from)."""
    node = store.node(run_id, "search")
    if node and node.get("outputs"):
        return str(node["outputs"]["run_id"])
    return run_id


def run_details(store: RunStore, run_id: str) -> dict[str, Any]:
    run = store.run(run_id)
    rid = run["id"]
    source = search_run_id(store, rid)
    trials = store.trials(source)
    ckpts = store.checkpoints(source)
    searcher = _recorded_searcher(store, source)
    for t in trials:
        t["checkpoints"] = [{"resource": c["resource"], "uri": c["uri"], "value": c["value"]}
                            for c in ckpts if c["trial_id"] == t["trial_id"]]
        t["searcher"] = searcher.trial_info(t["trial_id"]) if searcher else {}
    return {
        "id": rid, "spec_name": run["spec_name"], "status": run["status"], "created": run["created"],
        "finished": run["finished"], "error": run["error"], "reproduces": run["reproduces"],
        "summary": run["summary"], "spec": run["spec"], "provenance": run["provenance"],
        "nodes": [{k: n[k] for k in ("node_id", "kind", "key", "status", "reused_from", "started", "finished",
                                     "error")} for n in store.nodes(rid)],
        "search_run": source,
        "trials": trials,
        "decisions": searcher.decisions() if searcher else [],
        "validation": [n["outputs"] for n in store.nodes(rid) if n["kind"] == "validate" and n["outputs"]],
        "framework_flags": next((e["payload"] for e in store.events(source) if e["kind"] == "framework_flags"), None),
    }


def _recorded_searcher(store: RunStore, run_id: str) -> Any:
    """The run's searcher rebuilt from its saved state, or None when it cannot be (plugin gone)."""
    from mlk.errors import MlkError
    from mlk.registry import registry
    from mlk.stages.search import searcher_from_record

    node = store.node(run_id, "search")
    try:
        return searcher_from_record(registry(), store.run(run_id)["spec"], node["state"] if node else None)
    except (MlkError, KeyError, ValueError):
        return None


def list_runs(as_json: bool = False) -> int:
    store = RunStore()
    runs = store.runs()
    if as_json:
        print(json.dumps([{k: r[k] for k in ("id", "spec_name", "status", "created", "finished", "summary")}
                          for r in runs], indent=2, default=str))
        return 0
    from rich.table import Table

    from mlk.console import out_console

    table = Table(box=None, pad_edge=False)
    for col in ("run", "spec", "status", "started", "best", "trials"):
        table.add_column(col)
    for r in runs:
        s = r["summary"] or {}
        best = f"{s['metric']}={_num(s['best_value'])} (trial {s['best_trial']})" if s else "-"
        n = len(store.trials(search_run_id(store, r["id"])))
        table.add_row(r["id"], r["spec_name"], r["status"], _when(r["created"]), best, str(n))
    if not runs:
        out_console().print(f"no runs in {store.path}")
    else:
        out_console().print(table)
    return 0


def show_run(run_id: str, as_json: bool = False) -> int:
    store = RunStore()
    d = run_details(store, run_id)
    if as_json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    from rich.table import Table

    from mlk.console import out_console

    con = out_console()
    con.print(f"[bold]run {d['id']}[/]  spec {d['spec_name']}  status {d['status']}", highlight=False)
    con.print(f"started {_when(d['created'])}  finished {_when(d['finished'])}", highlight=False)
    if d["reproduces"]:
        con.print(f"reproduces run {d['reproduces']}", highlight=False)
    if d["error"]:
        con.print(f"[red]error[/]: {d['error']}", highlight=False)
    con.print("\n[bold]graph[/]")
    for n in d["nodes"]:
        extra = f" (reused from {n['reused_from']})" if n["reused_from"] else ""
        con.print(f"  {n['node_id']:<10} {n['status']:<8} {n['key'][:12]}{extra}", highlight=False)
    trials = d["trials"]
    if trials:
        con.print(f"\n[bold]trials[/] (run {d['search_run']})" if d["search_run"] != d["id"] else "\n[bold]trials[/]")
        hp_names = list(trials[0]["hparams"])
        metric_names = sorted({k for t in trials for k in (t["metrics"] or {})})
        info_names = sorted({k for t in trials for k in t["searcher"]})
        table = Table(box=None, pad_edge=False)
        for col in ("trial", *info_names, "state", "epochs", *hp_names, *metric_names, "checkpoint"):
            table.add_column(col)
        best = (d["summary"] or {}).get("best_trial")
        for t in trials:
            mark = "*" if t["trial_id"] == best else ""
            ck = t["checkpoints"][-1]["uri"].rsplit("/", 1)[-1] if t["checkpoints"] else "-"
            table.add_row(f"{t['trial_id']}{mark}", *[str(t["searcher"].get(k, "-")) for k in info_names],
                          t["status"], str(t["resource"]),
                          *[_num(t["hparams"].get(h)) for h in hp_names],
                          *[_num((t["metrics"] or {}).get(m, "-")) for m in metric_names], ck)
        con.print(table)
    if d["decisions"]:
        con.print("\n[bold]searcher decisions[/]", highlight=False)
        for line in decision_lines(d["decisions"]):
            con.print(f"  {line}", highlight=False)
    if d["validation"]:
        con.print("\n[bold]artifacts[/] (validated on the held-out split against the trained model)", highlight=False)
        table = Table(box=None, pad_edge=False)
        for col in ("artifact", "format", "accuracy", "change", "max diff", "p50@1 ms", "p99@1 ms", "p50@N ms",
                    "items/s@N", "size MB", "peak MB", "gates"):
            table.add_column(col)
        for r in d["validation"]:
            big = max(r["latency"], key=int)
            one = r["latency"].get("1")
            change = (r["accuracy"] - r["reference_accuracy"]) * 100
            gates = "ok" if r["gates"]["passed"] else "FAILED: " + "; ".join(r["gates"]["failures"])
            table.add_row(r["artifact"], r["format"], f"{r['accuracy']:.4f}", f"{change:+.2f} pts",
                          f"{r['max_output_diff']:.2e}", f"{one['p50_ms']:.3f}" if one else "-",
                          f"{one['p99_ms']:.3f}" if one else "-", f"{r['latency'][big]['p50_ms']:.3f} (N={big})",
                          f"{r['latency'][big]['throughput_per_s']:.0f}", f"{r['size_bytes'] / 1e6:.3f}",
                          f"{r['peak_rss_mb']:.0f}", gates)
        con.print(table)
    unavailable = [n for n in d["nodes"] if n["status"] in ("unavailable", "skipped")]
    for n in unavailable:
        con.print(f"  {n['node_id']}: {n['status']}: {n['error']}", highlight=False)
    s = d["summary"]
    if s:
        con.print(f"\n[bold]best[/]: trial {s['best_trial']} {s['metric']}={_num(s['best_value'])} at "
                  f"{s['best_resource']} epochs", highlight=False)
        con.print(f"  hyperparameters: {json.dumps(s['hparams'])}", highlight=False)
        con.print(f"  checkpoint: {s['checkpoint']}", highlight=False)
    p = d["provenance"] or {}
    if p:
        git = p.get("git", {})
        gits = (f"{git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}" if git.get("repository")
                else "not a git repository")
        hw = p.get("hardware", {})
        con.print("\n[bold]provenance[/]", highlight=False)
        con.print(f"  python {p.get('python', {}).get('version')}  {p.get('platform')}", highlight=False)
        con.print(f"  git {gits}  cwd {p.get('cwd')}", highlight=False)
        con.print(f"  hardware {hw.get('processor')} x{hw.get('usable_cpus')}  memory {hw.get('memory')}",
                  highlight=False)
        con.print(f"  seeds {json.dumps(p.get('seeds', {}))}", highlight=False)
        if "data" in p:
            con.print(f"  data {p['data']['name']} sha256 {p['data']['fingerprint'][:16]} {p['data']['sizes']}",
                      highlight=False)
        con.print(f"  plugins {', '.join(x['plugin'] + ' ' + x['version'] for x in p.get('plugins', []))}",
                  highlight=False)
        if d["framework_flags"]:
            ff = d["framework_flags"]
            con.print(f"  {ff['framework']} flags {json.dumps(ff['flags'])}", highlight=False)
        con.print(f"  packages: {len(p.get('packages', {}))} recorded (`mlk runs show {d['id']} --json`)",
                  highlight=False)
    return 0


def decision_lines(decisions: list[dict[str, Any]]) -> list[str]:
    """Decisions grouped by bracket and resource: 'bracket 2 @ 3 epochs: promoted 4, 9; stopped 1, 2'."""
    groups: dict[tuple[Any, Any], dict[str, list[str]]] = {}
    for d in decisions:
        key = (d.get("bracket", "-"), d.get("resource"))
        label = str(d["trial_id"]) + (f"->{d['by']}(from {d['from']})" if "by" in d else "")
        groups.setdefault(key, {}).setdefault(d["decision"], []).append(label)
    lines = []
    for (bracket, resource), by_decision in groups.items():
        where = f"bracket {bracket} @ {resource} epochs" if bracket != "-" else f"@ {resource} epochs"
        parts = "; ".join(f"{dec} {', '.join(ids)}" for dec, ids in by_decision.items())
        lines.append(f"{where}: {parts}")
    return lines


def print_summary(run_id: str) -> None:
    store = RunStore()
    run = store.run(run_id)
    s = run["summary"] or {}
    from mlk.console import out_console

    con = out_console()
    if not s:
        con.print(f"run {run_id}: {run['status']}", highlight=False)
        return
    metrics = ", ".join(f"{k}={_num(v)}" for k, v in sorted(s["best_metrics"].items()))
    con.print(f"\n[bold green]done[/] run {run_id}", highlight=False)
    con.print(f"  best trial {s['best_trial']} at {s['best_resource']} epochs: {metrics}", highlight=False)
    con.print(f"  hyperparameters: {json.dumps(s['hparams'])}", highlight=False)
    con.print(f"  checkpoint: {s['checkpoint']}", highlight=False)
    con.print(f"  details: mlk runs show {run_id}", highlight=False)
