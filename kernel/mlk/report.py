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
        "deployments": [{"node": n["node_id"], "status": n["status"], **_deployment(n)} for n in store.nodes(rid)
                        if n["kind"] == "deploy"],
        "framework_flags": next((e["payload"] for e in store.events(source) if e["kind"] == "framework_flags"), None),
    }


def _deployment(node: dict[str, Any]) -> dict[str, Any]:
    out = node["outputs"] or {}
    keys = ("model", "version", "target", "promoted", "bundle", "uri", "check", "artifacts")
    return {**{k: out.get(k) for k in keys}, "error": node["error"]}


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
    width = max([10, *(len(n["node_id"]) for n in d["nodes"])])
    for n in d["nodes"]:
        extra = f" (reused from {n['reused_from']})" if n["reused_from"] else ""
        con.print(f"  {n['node_id']:<{width}} {n['status']:<11} {n['key'][:12]}{extra}", highlight=False)
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
    if d["deployments"]:
        con.print("\n[bold]deployments[/]", highlight=False)
        for dep in d["deployments"]:
            con.print(f"  {deployment_line(dep)}", highlight=False)
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


def deployment_line(dep: dict[str, Any]) -> str:
    """'deploy/mobile: model m version 3 (production), checked: accuracy 0.93 (-0.00 pts), at FOLDER'."""
    if dep.get("version") is None:
        return f"{dep['node']}: {dep['status']}" + (f": {dep['error']}" if dep.get("error") else "")
    check = dep.get("check") or {}
    checked = ""
    if check.get("ran"):
        ref = check.get("reference_accuracy")
        checked = f", checked: accuracy {check['accuracy']:.4f}" + (
            f" ({(check['accuracy'] - ref) * 100:+.2f} pts)" if ref is not None else "")
    elif check.get("why"):
        checked = f", not checked: {check['why']}"
    return (f"{dep['node']}: model {dep['model']} version {dep['version']} ({dep['promoted']}), target "
            f"{dep['target']}{checked}, at {dep['bundle']}")


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
    for node_id, dep in (s.get("deployments") or {}).items():
        con.print(f"  {node_id}: model {dep['model']} version {dep['version']} ({dep['promoted']}) at {dep['bundle']}",
                  highlight=False)
    con.print(f"  details: mlk runs show {run_id}", highlight=False)


# -- the model registry ------------------------------------------------------------------------------


def list_models(name: str | None, as_json: bool = False) -> int:
    """``mlk models list [NAME]``: every model with its routing, or one model's versions and history."""
    from mlk.deployments import Registry

    reg = Registry()
    from mlk.console import out_console

    con = out_console()
    if name is None:
        rows: list[dict[str, Any]] = []
        for model in reg.names():
            versions, routing = reg.versions(model), reg.routing(model)
            rows.append({"model": model, "versions": len(versions), "target": versions[-1].target,
                         "production": routing.production.version if routing.production else None,
                         "canary": routing.canary.version if routing.canary else None,
                         "canary_percent": routing.canary_percent, "latest": versions[-1].version,
                         "latest_run": versions[-1].run_id})
        if as_json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            con.print(f"no models in {reg.store.path}; `mlk deploy RUN --target T` makes one", highlight=False)
            return 0
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        for col in ("model", "target", "versions", "production", "canary", "latest run"):
            table.add_column(col)
        for r in rows:
            canary = f"{r['canary']} ({r['canary_percent']:g}%)" if r["canary"] else "-"
            table.add_row(r["model"], r["target"], str(r["versions"]), str(r["production"] or "-"), canary,
                          r["latest_run"])
        con.print(table)
        return 0
    versions, routing, history = reg.versions(name), reg.routing(name), reg.history(name)
    roles = {}
    if routing.production:
        roles[routing.production.version] = "production"
    if routing.canary:
        roles[routing.canary.version] = f"canary {routing.canary_percent:g}%"
    if as_json:
        print(json.dumps({"model": name, "versions": [{**v.__dict__, "bundle": str(v.bundle),
                                                       "role": roles.get(v.version)} for v in versions],
                          "auto_rollback": routing.auto_rollback, "history": history}, indent=2, default=str))
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("version", "role", "run", "target", "format", "created", "checked", "bundle"):
        table.add_column(col)
    for v in versions:
        check = v.meta.get("check") or {}
        checked = f"accuracy {check['accuracy']:.4f}" if check.get("accuracy") is not None else "-"
        table.add_row(str(v.version), roles.get(v.version, "-"), v.run_id, v.target, v.format, _when(v.created),
                      checked, str(v.bundle))
    con.print(f"[bold]model {name}[/]", highlight=False)
    con.print(table)
    if routing.auto_rollback:
        con.print(f"auto rollback: {json.dumps(routing.auto_rollback)}", highlight=False)
    con.print("\n[bold]history[/]", highlight=False)
    for h in history:
        was = f" (was {h['previous']})" if h["previous"] is not None else ""
        why = f": {h['reason']}" if h["reason"] else ""
        con.print(f"  {_when(h['time'])}  {h['action']} {h['version']}{was}{why}", highlight=False)
    return 0


def monitor_model(name: str, as_json: bool = False, limit: int = 50) -> int:
    """``mlk monitor NAME``: the latest drift and traffic scores per version, against their thresholds."""
    from mlk.deployments import Registry

    reg = Registry()
    rows = reg.monitor(name, limit=limit)
    routing = reg.routing(name)
    latest: dict[int, dict[str, Any]] = {}
    for row in rows:  # newest first
        entry = latest.setdefault(row["version"], {"version": row["version"], "time": row["time"], "windows": 0,
                                                   "scores": row["scores"]})
        entry["windows"] += 1
    for version, entry in latest.items():
        thresholds = reg.get(name, version).meta.get("thresholds") or {}
        entry["role"] = ("production" if routing.production and routing.production.version == version else
                         "canary" if routing.canary and routing.canary.version == version else "-")
        entry["checks"] = {k: {"value": v, "threshold": thresholds.get(k),
                               "alert": thresholds.get(k) is not None and v > thresholds[k]}
                           for k, v in sorted(entry["scores"].items())}
        entry["alert"] = any(c["alert"] for c in entry["checks"].values())
    report = sorted(latest.values(), key=lambda e: e["version"])
    if as_json:
        print(json.dumps({"model": name, "versions": report}, indent=2))
        return 0
    from mlk.console import out_console

    con = out_console()
    if not report:
        con.print(f"model {name}: no monitor records yet (a server writes them while it serves)", highlight=False)
        return 0
    from rich.table import Table

    for entry in report:
        state = "[red]ALERT[/]" if entry["alert"] else "[green]ok[/]"
        con.print(f"[bold]{name} version {entry['version']}[/] ({entry['role']}) {state}  last window "
                  f"{_when(entry['time'])}, {entry['windows']} of the last {limit} records", highlight=False)
        table = Table(box=None, pad_edge=False)
        for col in ("score", "value", "threshold", "state"):
            table.add_column(col)
        for key, c in entry["checks"].items():
            threshold = "-" if c["threshold"] is None else _num(float(c["threshold"]))
            table.add_row(key, _num(float(c["value"])), threshold, "[red]alert[/]" if c["alert"] else "ok")
        con.print(table)
    return 0
