"""``mlk reproduce RUN``: run a recorded spec again, from scratch, and report every difference.

Differences are of two kinds: in the record (Python, packages, git state, plugins, hardware,
data fingerprint) and in the results (every metric of every trial at every epoch, compared
exactly). Exit status 0 when the results are identical, 1 when any differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlk.console import out_console
from mlk.store import RunStore


def _diff_dict(a: dict[str, Any], b: dict[str, Any], prefix: str) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def provenance_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    diffs += _diff_dict(old.get("python", {}), new.get("python", {}), "python.")
    diffs += _diff_dict(old.get("packages", {}), new.get("packages", {}), "package ")
    og, ng = old.get("git", {}), new.get("git", {})
    diffs += _diff_dict({k: og.get(k) for k in ("commit", "dirty")}, {k: ng.get(k) for k in ("commit", "dirty")},
                        "git.")
    diffs += _diff_dict({p["plugin"]: p["version"] for p in old.get("plugins", [])},
                        {p["plugin"]: p["version"] for p in new.get("plugins", [])}, "plugin ")
    hw_keys = ("machine", "processor", "usable_cpus")
    diffs += _diff_dict({k: old.get("hardware", {}).get(k) for k in hw_keys},
                        {k: new.get("hardware", {}).get(k) for k in hw_keys}, "hardware.")
    diffs += _diff_dict(old.get("threads", {}), new.get("threads", {}), "env ")
    diffs += _diff_dict(old.get("data", {}), new.get("data", {}), "data.")
    return diffs


def results_diff(store: RunStore, old_run: str, new_run: str) -> tuple[int, list[str]]:
    old = {(m["trial_id"], m["resource"]): m["metrics"] for m in store.metrics(old_run)}
    new = {(m["trial_id"], m["resource"]): m["metrics"] for m in store.metrics(new_run)}
    diffs = []
    same = 0
    for key in sorted(set(old) | set(new)):
        trial, epoch = key
        if key not in new:
            diffs.append(f"trial {trial} epoch {epoch}: missing in the reproduction")
        elif key not in old:
            diffs.append(f"trial {trial} epoch {epoch}: only in the reproduction")
        elif old[key] != new[key]:
            parts = [f"{k} {old[key].get(k)!r} -> {new[key].get(k)!r}" for k in sorted(set(old[key]) | set(new[key]))
                     if old[key].get(k) != new[key].get(k)]
            diffs.append(f"trial {trial} epoch {epoch}: " + ", ".join(parts))
        else:
            same += 1
    return same, diffs


def reproduce(run_ref: str, quiet: bool = False) -> int:
    from mlk.report import search_run_id
    from mlk.runner import execute
    from mlk.spec import validate_spec

    store = RunStore()
    run = store.run(run_ref)
    spec_file = Path((run["provenance"] or {}).get("spec", {}).get("file") or f"{run['spec_name']}.yaml")
    spec = validate_spec(run["spec"], spec_file)
    new_id = execute(spec, fresh=True, quiet=quiet, reproduces=run["id"])
    new = store.run(new_id)
    con = out_console()
    con.print(f"\nreproduction {new_id} of {run['id']}", highlight=False)
    pdiffs = provenance_diff(run["provenance"] or {}, new["provenance"] or {})
    if pdiffs:
        con.print(f"[yellow]record differs[/] in {len(pdiffs)} place(s):", highlight=False)
        for d in pdiffs:
            con.print(f"  {d}", highlight=False)
    else:
        con.print("record: same Python, packages, git state, plugins, hardware and data", highlight=False)
    same, rdiffs = results_diff(store, search_run_id(store, run["id"]), new_id)
    if rdiffs:
        con.print(f"[red]results differ[/]: {len(rdiffs)} report(s) differ, {same} identical", highlight=False)
        for d in rdiffs[:50]:
            con.print(f"  {d}", highlight=False)
        if not spec["reproducibility"]["deterministic"]:
            con.print("  (the spec does not set reproducibility.deterministic: true)", highlight=False)
        return 1
    con.print(f"[green]results identical[/]: all {same} trial reports match bit for bit", highlight=False)
    return 0
