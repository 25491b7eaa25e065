"""The ``mlk`` command. Parsing imports nothing heavy; each verb imports what it needs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

EPILOG = """\
examples:
  mlk run +spec=digits_random                      search, train, select; resumes if interrupted
  mlk run +spec=digits_random searcher.max_trials=4 resources.max_concurrent_trials=2
  mlk graph +spec=digits_random                    the plan, nothing run
  mlk spec show +spec=digits_random                the resolved, validated spec
  mlk plugins list                                 installed plugins and their status
  mlk runs show RUN                                trials, best trial, checkpoints, provenance
  mlk reproduce RUN                                run again from the record and compare
  mlk deploy RUN --target mobile                   bundle, check, register and promote a finished run
  mlk serve RUN_OR_MODEL --port 3000               serve a registered model (deploys a run to `server` first)
  mlk models list                                  registered models, their production and canary versions
  mlk models promote NAME 3 --canary 10            send 10% of NAME's traffic to version 3
  mlk monitor NAME                                 drift and traffic scores per version, with alerts

environment: MLK_HOME (run store, default ./.mlk), MLK_SPEC_PATH, MLK_PLUGINS_LOCK,
  MLK_DISABLE_PLUGIN_AUTOLOAD=1, MLK_TRACE_PLUGINS=1, MLK_FULL_ERROR=1 (tracebacks)
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlk", description="mlk: declarative ML lifecycle runs.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def overrides(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="+spec=NAME and Hydra overrides (key=value, +new_key=value, ~key)")

    sp = sub.add_parser("run", help="compose, validate, plan, execute and record a run")
    overrides(sp)
    sp.add_argument("--fresh", action="store_true", help="recompute every node instead of resuming or reusing")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress output")

    sp = sub.add_parser("graph", help="print the run graph a spec would execute; nothing runs")
    overrides(sp)
    sp.add_argument("--json", action="store_true")

    spec = sub.add_parser("spec", help="show a resolved spec, or the JSON schema of specs")
    spec_sub = spec.add_subparsers(dest="spec_command", metavar="ACTION", required=True)
    overrides(spec_sub.add_parser("show", help="the resolved, validated spec as YAML"))
    spec_sub.add_parser("schema", help="JSON schema of a spec, plugin sections included")
    spec_sub.add_parser("list", help="names of the specs that +spec= finds, and where")
    spec_sub.add_parser("reference", help="Markdown reference of every spec key, installed plugins included")

    plugins = sub.add_parser("plugins", help="installed plugins")
    pl_sub = plugins.add_subparsers(dest="plugins_command", metavar="ACTION", required=True)
    pl_list = pl_sub.add_parser("list", help="group, name, distribution, version, status")
    pl_list.add_argument("--json", action="store_true")
    pl_sub.add_parser("lock", help="print a lock of the installed plugin set (redirect to plugins.lock)")

    runs = sub.add_parser("runs", help="recorded runs")
    runs_sub = runs.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    rl = runs_sub.add_parser("list", help="every run in the store")
    rl.add_argument("--json", action="store_true")
    rs = runs_sub.add_parser("show", help="trials, best trial, checkpoints and provenance of a run")
    rs.add_argument("run")
    rs.add_argument("--json", action="store_true")
    rp = runs_sub.add_parser("plot", help="PNG figures: learning curves by bracket, best so far vs epochs")
    rp.add_argument("run")
    rp.add_argument("--out", help="folder for the figures (default $MLK_HOME/plots/RUN)")
    rr = runs_sub.add_parser("resume", help="continue an interrupted run, optionally with a larger budget")
    rr.add_argument("run")
    rr.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                    help="safe changes only, e.g. searcher.max_trials=64 resources.max_concurrent_trials=4")
    rr.add_argument("--quiet", "-q", action="store_true")

    rp = sub.add_parser("reproduce", help="re-run a run from its record and report every difference")
    rp.add_argument("run")
    rp.add_argument("--quiet", "-q", action="store_true")

    dp = sub.add_parser("deploy", help="deploy a finished run to a target (reusing its search, compile and validate)")
    dp.add_argument("run")
    dp.add_argument("--target", required=True, help="a plugin of mlk.targets (server, jetson, mobile, ...)")
    dp.add_argument("--model", help="registry model name (default: the spec's deploy entry, or the spec's name)")
    dp.add_argument("--quiet", "-q", action="store_true")

    sv = sub.add_parser("serve", help="serve a registered model, or a run's (deployed to the server target first)")
    sv.add_argument("model", metavar="RUN_OR_MODEL")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=3000)
    sv.add_argument("--token-env", metavar="VAR", help="require `Authorization: Bearer $VAR` on every request")

    models = sub.add_parser("models", help="the model registry: versions, production, canary, rollback")
    md_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ml = md_sub.add_parser("list", help="every model, or one model's versions and history")
    ml.add_argument("name", nargs="?")
    ml.add_argument("--json", action="store_true")
    mp = md_sub.add_parser("promote", help="make a version production, or a canary with --canary PERCENT")
    mp.add_argument("name")
    mp.add_argument("model_version", type=int, metavar="VERSION")
    mp.add_argument("--canary", type=float, metavar="PERCENT", help="share of traffic the version takes beside "
                                                                    "production")
    mr = md_sub.add_parser("rollback", help="drop the canary, or return to the previous production version")
    mr.add_argument("name")
    mr.add_argument("--reason", default="by hand", help="recorded in the model's history")

    mo = sub.add_parser("monitor", help="drift and traffic scores a server recorded, per version, with alerts")
    mo.add_argument("name")
    mo.add_argument("--limit", type=int, default=50, help="monitor records read (newest first)")
    mo.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # As `python -m` does: the user's own modules (trial functions, `_target_` models) import from
    # the working directory, in this process and in the workers it starts.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    args = _parser().parse_args(argv)
    if args.version:
        from importlib.metadata import version

        print(f"mlk {version('mlk-kernel')}")
        return 0
    if not args.command:
        _parser().print_help()
        return 0
    from mlk.errors import MlkError, UserError

    try:
        return int(_dispatch(args) or 0)
    except UserError as e:
        if os.environ.get("MLK_FULL_ERROR"):
            raise
        print(f"mlk: error: {e.render()}", file=sys.stderr)
        return 2
    except MlkError as e:
        if os.environ.get("MLK_FULL_ERROR"):
            raise
        print(f"mlk: error: {e}\n  (set MLK_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mlk: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _dispatch(args: argparse.Namespace) -> int | None:
    if args.command == "run":
        from mlk.runner import execute
        from mlk.spec import load_spec

        spec = load_spec(args.overrides)
        run_id = execute(spec, fresh=args.fresh, quiet=args.quiet)
        from mlk.report import print_summary

        print_summary(run_id)
        return 0
    if args.command == "graph":
        return _graph(args)
    if args.command == "spec":
        return _spec(args)
    if args.command == "plugins":
        return _plugins(args)
    if args.command == "runs":
        return _runs(args)
    if args.command == "reproduce":
        from mlk.reproduce import reproduce

        return reproduce(args.run, quiet=args.quiet)
    if args.command == "deploy":
        from mlk.report import print_summary
        from mlk.stages.deploy import deploy_run

        run_id = deploy_run(args.run, args.target, args.model, quiet=args.quiet)
        print_summary(run_id)
        return 0
    if args.command == "serve":
        return _serve(args)
    if args.command == "models":
        return _models(args)
    if args.command == "monitor":
        from mlk.report import monitor_model

        return monitor_model(args.name, as_json=args.json, limit=args.limit)
    raise AssertionError(args.command)


def _serve(args: argparse.Namespace) -> int:
    from mlk.deployments import Registry
    from mlk.errors import UserError
    from mlk.registry import registry
    from mlk.stages.deploy import deploy_run
    from mlk.store import RunStore

    if not 0 < args.port < 65536:
        raise UserError(f"port {args.port} is not between 1 and 65535", where="--port")
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise UserError(f"environment variable {args.token_env} is not set or empty", where="--token-env",
                            hint=f"export {args.token_env}=SECRET, or leave --token-env out to serve without a token")
    models = Registry()
    name = args.model
    if name not in models.names():
        store = RunStore()
        try:
            run = store.run(name)
        except UserError:
            runs = [r["id"] for r in store.runs()][-20:]
            raise UserError(f"'{name}' is neither a model in the registry nor a run", where="mlk serve",
                            choices=[*models.names(), *runs], got=name) from None
        versions = models.by_run(run["id"], target="server")
        if not versions:
            deploy_run(run["id"], "server", None)
            versions = models.by_run(run["id"], target="server")
        if not versions:
            raise UserError(f"run {run['id']} could not be deployed to the server target", where="mlk serve")
        name = versions[-1].name
    routing = models.routing(name)
    if routing.production is None:
        raise UserError(f"model '{name}' has no production version to serve", where="mlk serve",
                        hint=f"promote one: `mlk models promote {name} VERSION`")
    cls = registry().get("targets", routing.production.target, where="mlk serve")
    target = cls(cls.Config.model_validate({"name": cls.name}))
    target.serve(name, home=models.home, host=args.host, port=args.port, token=token)
    return 0


def _models(args: argparse.Namespace) -> int:
    from mlk.report import list_models

    if args.models_command == "list":
        return list_models(args.name, as_json=args.json)
    from mlk.deployments import Registry

    models = Registry()
    if args.models_command == "promote":
        routing = models.promote(args.name, args.model_version, canary_percent=args.canary)
    else:
        routing = models.rollback(args.name, reason=args.reason)
    production = routing.production.version if routing.production else "-"
    canary = f", canary {routing.canary.version} ({routing.canary_percent:g}% of traffic)" if routing.canary else ""
    print(f"{args.name}: production {production}{canary}")
    return 0


def _graph(args: argparse.Namespace) -> int:
    from mlk.graph import plan
    from mlk.registry import registry
    from mlk.spec import load_spec

    spec = load_spec(args.overrides)
    graph = plan(spec, registry().hooks)
    backend_cls = registry().get("backends", spec.resources.backend, where="resources.backend")
    backend_plan = backend_cls(spec.resources, spec.file.parent).describe()
    if args.json:
        print(json.dumps({"spec": spec.name, "hash": spec.hash, "nodes": graph.to_dict(), "backend": backend_plan},
                         indent=2))
        return 0
    from mlk.store import RunStore

    store = RunStore()
    # Volatile nodes key on what they find; assume they find what they found last time.
    found = {}
    for node in graph.nodes:
        if node.volatile:
            last = store.last_volatile_output(node.kind, node.key)
            if last and last.get("fingerprint"):
                found[node.id] = last["fingerprint"]
    graph.rekey(found)
    print(f"run graph of {spec.name} ({spec.file})")
    width = max(len(n.id) for n in graph.nodes)
    for node in graph.nodes:
        done = None if node.volatile else store.completed_node(node.key)
        if node.volatile:
            state = "always runs" + (f" (last found {found[node.id][:12]})" if node.id in found else "")
        else:
            state = f"reuse from {done['run_id']}" if done else "to run"
        deps = f" <- {', '.join(node.inputs)}" if node.inputs else ""
        print(f"  {node.id:<{width}} [{node.kind}] {node.key[:12]}  {state}{deps}")
        if node.describe:
            print(f"  {'':<{width}} {node.describe}")
    print(f"  backend: {json.dumps(backend_plan)}")
    return 0


def _spec(args: argparse.Namespace) -> int:
    if args.spec_command == "schema":
        from mlk.spec import spec_schema

        print(json.dumps(spec_schema(), indent=2))
        return 0
    if args.spec_command == "reference":
        from mlk.reference import spec_reference_markdown
        from mlk.registry import registry

        print(spec_reference_markdown(registry()), end="")
        return 0
    if args.spec_command == "list":
        from mlk.spec import spec_dirs

        seen = set()
        for d in spec_dirs():
            for path in sorted(d.glob("*.yaml")):
                shadow = " (shadowed)" if path.stem in seen else ""
                seen.add(path.stem)
                print(f"{path.stem:<24} {path}{shadow}")
        return 0
    import yaml

    from mlk.spec import load_spec

    spec = load_spec(args.overrides)
    print(f"# {spec.name} from {spec.file} (hash {spec.hash[:12]})")
    print(yaml.safe_dump(spec.data, sort_keys=False), end="")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from mlk.registry import registry

    reg = registry()
    if args.plugins_command == "lock":
        from mlk.lock import lock_data

        print(json.dumps(lock_data(reg), indent=2))
        return 0
    rows: list[dict[str, Any]] = []
    for entry in reg.entries():
        status, detail = entry.status()
        rows.append({"group": entry.group, "name": entry.name, "distribution": entry.distribution,
                     "version": entry.version, "value": entry.value, "status": status, "detail": detail})
    if args.json:
        print(json.dumps({"plugins": rows, "problems": reg.problems}, indent=2))
        return 0
    from rich.table import Table

    from mlk.console import out_console

    table = Table(box=None, pad_edge=False)
    for col in ("group", "name", "distribution", "version", "status"):
        table.add_column(col)
    colour = {"ok": "green", "unavailable": "yellow", "broken": "red"}
    for r in rows:
        status = f"[{colour[r['status']]}]{r['status']}[/]" + (f": {r['detail']}" if r["detail"] else "")
        table.add_row(r["group"], r["name"], r["distribution"], r["version"], status)
    out_console().print(table)
    for problem in reg.problems:
        out_console().print(f"[red]problem[/]: {problem}", highlight=False)
    return 0


def _runs(args: argparse.Namespace) -> int:
    from mlk import report

    if args.runs_command == "list":
        return report.list_runs(as_json=args.json)
    if args.runs_command == "show":
        return report.show_run(args.run, as_json=args.json)
    if args.runs_command == "plot":
        from pathlib import Path

        from mlk.plot import plot_run

        for path in plot_run(args.run, Path(args.out) if args.out else None):
            print(path)
        return 0
    from mlk.runner import execute
    from mlk.spec import validate_spec
    from mlk.store import RunStore

    run = RunStore().run(args.run)
    if args.overrides:
        spec = _recorded_spec_with(run, args.overrides)
    elif run["status"] == "completed":
        print(f"run {run['id']} already completed; give overrides (e.g. searcher.max_trials=N) to extend it")
        return 0
    else:
        spec = validate_spec(run["spec"], _spec_path(run))
    run_id = execute(spec, quiet=args.quiet, resume_run=run["id"])
    report.print_summary(run_id)
    return 0


def _recorded_spec_with(run: dict[str, Any], overrides: list[str]) -> Any:
    """The run's recorded spec with Hydra overrides applied (composed from a copy of the record)."""
    import tempfile
    from pathlib import Path

    import yaml

    from mlk.spec import load_spec

    with tempfile.TemporaryDirectory(prefix="mlk-resume-") as tmp:
        path = Path(tmp) / f"{run['spec_name']}.yaml"
        path.write_text(yaml.safe_dump(run["spec"], sort_keys=False))
        spec = load_spec([f"+spec={path}", *overrides])
    spec.file = _spec_path(run)
    return spec


def _spec_path(run: dict[str, Any]) -> Any:
    from mlk.spec import recorded_spec_path

    return recorded_spec_path(run)


if __name__ == "__main__":
    raise SystemExit(main())
