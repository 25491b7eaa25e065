"""Kernel benchmarks of issue 2, side by side with the peers, in one run.

    python -m benchmarks.kernel.run            # the real run (~5 minutes on 2 cores)
    python -m benchmarks.kernel.run --quick    # a smoke test: few repetitions, few trials

Measures (1) CLI cold start of ``mlk --help`` against ``mlflow --help`` and ``ray --help``;
(2) ``python -c "import mlk"`` and which framework modules that import pulls in; (3) composing
and validating a spec against Hydra's compose alone on the same file; (4) per-trial overhead of
the local backend on a no-op trial against Ray Tune and Optuna. Progress goes to stderr; the
markdown table goes to stdout and everything measured to ``benchmarks/kernel/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SPEC_DIR = HERE / "specs"
RESULTS = HERE / "results.json"
BENCH_SPEC = "bench_noop"
COMPOSE_SPEC = "digits_random"
#: Modules that ``import mlk`` must not load.
FRAMEWORK_MODULES = ("torch", "tensorflow", "jax", "numpy", "pydantic", "hydra")

GOAL_CLI_RATIO = 0.5
GOAL_CLI_SECONDS = 0.5
GOAL_IMPORT_SECONDS = 0.150
GOAL_COMPOSE_RATIO = 1.2
GOAL_RAY_RATIO = 0.2


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def venv_bin(name: str) -> str:
    """An executable of the interpreter's own environment (``.venv/bin/mlk``), not of PATH."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {name} installed in this environment?")
    return str(path)


def summary(samples: Sequence[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "runs_s": [round(s, 6) for s in samples]}


@contextlib.contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Set (or, with None, remove) environment variables for the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def with_pythonpath(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the repository on PYTHONPATH, so child processes import ``benchmarks``."""
    parts = [str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {**env, "PYTHONPATH": os.pathsep.join(parts)}


def time_command(cmd: Sequence[str], reps: int, warmup: int = 1, cwd: str | None = None,
                 env: dict[str, str] | None = None) -> list[float]:
    """Wall time of ``cmd`` in a fresh process, ``reps`` times after ``warmup`` untimed runs."""
    samples = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode()[-2000:]}")
        if i >= warmup:
            samples.append(seconds)
    return samples


# -- 1. CLI cold start ------------------------------------------------------------------------------


def bench_cli(tools: Sequence[str] = ("mlk", "mlflow", "ray"), reps: int = 7,
              warmup: int = 1) -> dict[str, Any]:
    """``TOOL --help`` in a new process for each tool, median of ``reps`` after ``warmup``."""
    out: dict[str, Any] = {"reps": reps, "warmup": warmup, "tools": {}}
    with tempfile.TemporaryDirectory(prefix="mlk-bench-cli-") as cwd:
        for tool in tools:
            say(f"cli: {tool} --help x{warmup}+{reps} ...")
            samples = time_command([venv_bin(tool), "--help"], reps, warmup, cwd=cwd)
            out["tools"][tool] = summary(samples)
            say(f"cli: {tool} --help median {out['tools'][tool]['median_s'] * 1000:.0f} ms")
    mlk = out["tools"].get("mlk")
    peers = {t: r["median_s"] for t, r in out["tools"].items() if t != "mlk"}
    if mlk and peers:
        fastest = min(peers, key=lambda t: peers[t])
        out["fastest_peer"] = fastest
        out["ratios"] = {t: mlk["median_s"] / s for t, s in peers.items()}
        out["ratio_vs_fastest_peer"] = mlk["median_s"] / peers[fastest]
        out["met"] = out["ratio_vs_fastest_peer"] <= GOAL_CLI_RATIO and mlk["median_s"] <= GOAL_CLI_SECONDS
    elif mlk:
        out["met"] = mlk["median_s"] <= GOAL_CLI_SECONDS
    return out


# -- 2. import mlk ------------------------------------------------------------------------------------

_MODULES_PROBE = (
    "import sys, json\n"
    "import {module}\n"
    "loaded = sorted(m for m in {names!r} if m in sys.modules)\n"
    "deps = {{'rich', 'omegaconf', 'pluggy', 'yaml', 'sqlite3'}}\n"
    "heavy = sorted({{m.split('.')[0] for m in sys.modules}} & deps)\n"
    "print(json.dumps({{'frameworks': loaded, 'modules': len(sys.modules), 'other_deps': heavy}}))\n"
)


def modules_loaded_by(module: str) -> dict[str, Any]:
    """Which of FRAMEWORK_MODULES (and of mlk's own dependencies) ``import module`` loads."""
    code = _MODULES_PROBE.format(module=module, names=FRAMEWORK_MODULES)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def bench_import(reps: int = 7, warmup: int = 1) -> dict[str, Any]:
    """``python -c "import mlk"`` against a bare interpreter; the framework modules it (and mlk.cli) loads."""
    say(f"import: python -c 'import mlk' x{warmup}+{reps} ...")
    mlk = time_command([sys.executable, "-c", "import mlk"], reps, warmup)
    bare = time_command([sys.executable, "-c", "pass"], reps, warmup)
    out: dict[str, Any] = {"reps": reps, "import_mlk": summary(mlk), "bare_python": summary(bare)}
    out["import_cost_s"] = out["import_mlk"]["median_s"] - out["bare_python"]["median_s"]
    out["loaded"] = {m: modules_loaded_by(m) for m in ("mlk", "mlk.cli")}
    out["frameworks_imported"] = out["loaded"]["mlk"]["frameworks"]
    out["met"] = out["import_mlk"]["median_s"] <= GOAL_IMPORT_SECONDS and not out["frameworks_imported"]
    say(f"import: median {out['import_mlk']['median_s'] * 1000:.0f} ms (bare python "
        f"{out['bare_python']['median_s'] * 1000:.0f} ms); "
        f"frameworks loaded: {out['frameworks_imported'] or 'none'}")
    return out


# -- 3. compose + validate ----------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall and CPU seconds of one call of ``fn``, after a collection so earlier garbage is not billed."""
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_compose(reps: int = 60, spec: str = COMPOSE_SPEC) -> dict[str, Any]:
    """``load_spec(["+spec=NAME"])`` against Hydra's initialize_config_dir + compose of the same file.

    In this process, after one warm-up call of each; the timed calls alternate so drift hits both
    alike. mlk's compose and validate halves are timed too, to show where its time goes. The goal
    is judged on wall time; CPU time (this process only) is recorded beside it because on a shared
    2-core machine other processes' load shows up in wall time but not in CPU time.
    """
    from hydra import compose, initialize_config_dir

    from mlk.spec import compose as mlk_compose
    from mlk.spec import find_spec_file, load_spec, validate_spec

    say(f"compose: first load_spec(+spec={spec}) in this process ...")
    first, _ = _timed(lambda: load_spec([f"+spec={spec}"]))
    path = find_spec_file(spec)

    def hydra_only() -> None:
        with initialize_config_dir(config_dir=str(path.parent), version_base="1.3"):
            compose(path.stem)

    _, raw = mlk_compose([f"+spec={spec}"])
    calls: dict[str, Callable[[], Any]] = {
        "mlk_load_spec": lambda: load_spec([f"+spec={spec}"]),
        "hydra_compose": hydra_only,
        "mlk_compose_only": lambda: mlk_compose([f"+spec={spec}"]),
        "mlk_validate_only": lambda: validate_spec(raw, path),
    }
    for fn in calls.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    say(f"compose: {len(calls)} variants x{reps}, interleaved ...")
    for i in range(reps):
        order = list(calls) if i % 2 == 0 else list(reversed(calls))
        for key in order:
            wall, used = _timed(calls[key])
            samples[key].append(wall)
            cpu[key].append(used)
    out: dict[str, Any] = {"spec": spec, "file": str(path), "reps": reps, "first_call_s": first}
    out.update({k: {**summary(v), "cpu_median_s": statistics.median(cpu[k])} for k, v in samples.items()})
    mlk, hydra = out["mlk_load_spec"], out["hydra_compose"]
    out["ratio"] = mlk["median_s"] / hydra["median_s"]
    out["ratio_of_minimums"] = mlk["min_s"] / hydra["min_s"]
    out["ratio_cpu"] = mlk["cpu_median_s"] / hydra["cpu_median_s"]
    out["met"] = out["ratio"] <= GOAL_COMPOSE_RATIO
    say(f"compose: mlk load_spec {mlk['median_s'] * 1000:.1f} ms vs hydra compose "
        f"{hydra['median_s'] * 1000:.1f} ms (ratio {out['ratio']:.2f}; of minimums "
        f"{out['ratio_of_minimums']:.2f}; of CPU time {out['ratio_cpu']:.2f})")
    return out


# -- 4. per-trial overhead ----------------------------------------------------------------------------


def _store_figures(home: Path, run_id: str) -> dict[str, Any]:
    from mlk.store import RunStore

    store = RunStore(home)
    try:
        nodes = {n["node_id"]: n for n in store.nodes(run_id)}
        trials = store.trials(run_id)
        run = store.run(run_id)
    finally:
        store.close()
    statuses: dict[str, int] = {}
    for t in trials:
        statuses[t["status"]] = statuses.get(t["status"], 0) + 1
    latency = [t["updated"] - t["created"] for t in trials]
    return {
        "run_status": run["status"],
        "nodes_s": {k: n["finished"] - n["started"] for k, n in nodes.items()
                    if n["finished"] and n["started"]},
        "trials": len(trials),
        "trial_statuses": statuses,
        "trial_latency_mean_s": statistics.fmean(latency) if latency else 0.0,
    }


def mlk_run_in_process(trials: int) -> dict[str, Any]:
    """One ``load_spec`` + ``execute`` of the no-op spec in a new, empty run store."""
    from mlk.runner import execute
    from mlk.spec import load_spec

    home = Path(tempfile.mkdtemp(prefix="mlk-bench-home-"))
    try:
        with environ(MLK_HOME=str(home), MLK_SPEC_PATH=str(SPEC_DIR)):
            t0 = time.perf_counter()
            spec = load_spec([f"+spec={BENCH_SPEC}", f"searcher.max_trials={trials}"])
            run_id = execute(spec, quiet=True)
            total = time.perf_counter() - t0
        figures = _store_figures(home, run_id)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    search = figures["nodes_s"]["search"]
    return {"requested": trials, "end_to_end_s": total, "search_s": search, "per_trial_s": search / trials,
            **figures}


def mlk_run_cli(trials: int) -> dict[str, Any]:
    """``mlk run +spec=bench_noop`` in a fresh process: cold end to end, as a user runs it."""
    work = Path(tempfile.mkdtemp(prefix="mlk-bench-cli-run-"))
    home = work / "home"
    env = with_pythonpath({**os.environ, "MLK_HOME": str(home), "MLK_SPEC_PATH": str(SPEC_DIR)})
    cmd = [venv_bin("mlk"), "run", f"+spec={BENCH_SPEC}", f"searcher.max_trials={trials}", "-q"]
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        total = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
        from mlk.store import RunStore

        store = RunStore(home)
        try:
            run_id = store.runs()[-1]["id"]
        finally:
            store.close()
        figures = _store_figures(home, run_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    search = figures["nodes_s"]["search"]
    return {"requested": trials, "end_to_end_s": total, "search_s": search, "per_trial_s": search / trials,
            **figures}


def bench_mlk_trials(trials: int = 500, reps: int = 3, warmup_trials: int = 20,
                     cli: bool = True) -> dict[str, Any]:
    """The local backend, 2 workers, no-op trials: search-node wall time per trial (from the store)."""
    out: dict[str, Any] = {"trials": trials, "reps": reps, "workers": 2}
    if warmup_trials:
        say(f"mlk trials: warm-up run of {warmup_trials} trials in this process ...")
        out["warmup"] = mlk_run_in_process(warmup_trials)
    runs = []
    for i in range(reps):
        say(f"mlk trials: run {i + 1}/{reps}, {trials} no-op trials, 2 workers ...")
        r = mlk_run_in_process(trials)
        if r["trial_statuses"] != {"completed": trials}:
            raise RuntimeError(f"mlk run did not complete {trials} trials: {r['trial_statuses']}")
        say(f"mlk trials: search {r['search_s']:.2f}s = {r['per_trial_s'] * 1000:.2f} ms/trial; "
            f"end to end {r['end_to_end_s']:.2f}s")
        runs.append(r)
    out["runs"] = runs
    out["per_trial_s"] = statistics.median(r["per_trial_s"] for r in runs)
    out["search_s"] = statistics.median(r["search_s"] for r in runs)
    out["end_to_end_s"] = statistics.median(r["end_to_end_s"] for r in runs)
    if cli:
        say(f"mlk trials: `mlk run` CLI in a fresh process, {trials} trials ...")
        out["cli"] = mlk_run_cli(trials)
        say(f"mlk trials: CLI search {out['cli']['search_s']:.2f}s = {out['cli']['per_trial_s'] * 1000:.2f} "
            f"ms/trial; end to end {out['cli']['end_to_end_s']:.2f}s")
    return out


def bench_optuna(trials: int = 500, reps: int = 3) -> dict[str, Any]:
    """Optuna in this process, RandomSampler, in-memory storage, a function returning a float."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial: Any) -> float:
        return trial.suggest_float("x", 0.0, 1.0)

    samples = []
    for i in range(reps):
        say(f"optuna: run {i + 1}/{reps}, {trials} trials ...")
        t0 = time.perf_counter()
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=i))
        study.optimize(objective, n_trials=trials)
        samples.append(time.perf_counter() - t0)
        if len(study.trials) != trials:
            raise RuntimeError(f"optuna ran {len(study.trials)} trials, not {trials}")
    out = {"trials": trials, "reps": reps, **summary(samples), "version": optuna.__version__}
    out["per_trial_s"] = out["median_s"] / trials
    say(f"optuna: {out['per_trial_s'] * 1000:.3f} ms/trial")
    return out


def _short_tmp() -> str:
    """A short temp folder: Ray puts unix sockets under it, and socket paths are limited to ~107 bytes."""
    default = tempfile.gettempdir()
    return default if len(default) <= 20 else "/tmp"


def _processes_of(session: int, marker: str) -> dict[int, str]:
    """PID -> command line of the processes in session ``session`` or whose command line names
    ``marker`` (our Ray temp folder): what the Ray child started, even once orphaned."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if (len(fields) > 3 and int(fields[3]) == session) or marker in cmdline:
            found[int(entry.name)] = cmdline.strip()[:200]
    return found


def _stop_processes(pids: list[int], grace: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def bench_ray(default_trials: int = 150, reuse_trials: int = 500, timeout: float = 900.0) -> dict[str, Any]:
    """Ray Tune in a child process (see ``ray_child``); everything Ray starts is stopped afterwards."""
    tmp = tempfile.mkdtemp(prefix="mlkrb-", dir=_short_tmp())
    # HOME too: ray.init writes a new cluster's auth token to ~/.ray/auth_token, which must not outlive us.
    env = with_pythonpath({**os.environ, "RAY_TMPDIR": tmp, "HOME": tmp,
                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    cmd = [sys.executable, "-m", "benchmarks.kernel.ray_child", f"default={default_trials}",
           f"reuse={reuse_trials}"]
    log_path = Path(tmp) / "child.log"
    result: dict[str, Any] | None = None
    say(f"ray: child process, ray.init then {default_trials} trials (defaults) and {reuse_trials} trials "
        "(reuse_actors=True) ...")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    leftovers: dict[int, str] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("progress: "):
                say(line.removeprefix("progress: "))
            elif line.startswith("result: "):
                result = json.loads(line.removeprefix("result: "))
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        leftovers = _processes_of(proc.pid, tmp)
        _stop_processes(list(leftovers))
        log_tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        # Ray's temp dir is tmp/ray (RAY_TMPDIR), so its ray_current_cluster file, if any, goes with
        # tmp; the shared /tmp/ray is never touched (another session's cluster may own it).
        (Path(tmp) / "ray" / "ray_current_cluster").unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - t0
    if result is None or proc.returncode != 0:
        raise RuntimeError(f"the Ray child exited {proc.returncode} without a result; "
                           f"its log ends:\n{log_tail}")
    result["child_wall_s"] = wall
    result["leftover_processes_stopped"] = list(leftovers.values())
    say(f"ray: done in {wall:.0f}s; {len(leftovers)} leftover process(es) stopped")
    return result


def bench_trials(trials: int, reps: int, ray_default_trials: int, ray_reuse_trials: int,
                 skip_ray: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"mlk": bench_mlk_trials(trials, reps), "optuna": bench_optuna(trials, reps)}
    if not skip_ray:
        out["ray"] = bench_ray(ray_default_trials, ray_reuse_trials)
    mlk = out["mlk"]["per_trial_s"]
    out["ratio_mlk_optuna"] = mlk / out["optuna"]["per_trial_s"]
    if "ray" in out:
        out["ratio_mlk_ray"] = mlk / out["ray"]["configs"]["default"]["per_trial_s"]
        out["ratio_mlk_ray_reuse"] = mlk / out["ray"]["configs"]["reuse"]["per_trial_s"]
        out["met"] = out["ratio_mlk_ray"] <= GOAL_RAY_RATIO
    return out


# -- report -------------------------------------------------------------------------------------------


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: other work on this 2-core machine skews every timing."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {}
    for dist in ("mlk-kernel", "hydra-core", "omegaconf", "pydantic", "optuna", "ray", "mlflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {"cpu": cpu, "cores": cores, "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions, "git": git_state()}


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the kernel or plugins differed from it."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--", "kernel", "plugins")
    return {"commit": git("rev-parse", "HEAD") or None, "kernel_or_plugins_modified": bool(dirty)}


def _ms(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _yes(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "**no**")


def table_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """measurement | mlk | peer | ratio | goal | met? rows for what ``results`` holds."""
    rows: list[dict[str, str]] = []

    def row(measurement: str, mlk: str, peer: str, ratio: str, goal: str, met: bool | None) -> None:
        rows.append({"measurement": measurement, "mlk": mlk, "peer": peer, "ratio": ratio, "goal": goal,
                     "met": _yes(met)})

    cli = results.get("cli")
    if cli:
        tools = cli["tools"]
        peers = ", ".join(f"{t} {_ms(r['median_s'])}" for t, r in tools.items() if t != "mlk") or "not run"
        ratio = (", ".join(f"{cli['ratios'][t]:.3f}x {t}" for t in cli["ratios"])) if "ratios" in cli else "-"
        row(f"CLI cold start `--help` (median of {cli['reps']})", _ms(tools["mlk"]["median_s"]), peers, ratio,
            f"<= {GOAL_CLI_RATIO}x faster peer and <= {GOAL_CLI_SECONDS} s", cli.get("met"))
    imp = results.get("import")
    if imp:
        frameworks = ", ".join(imp["frameworks_imported"]) or "none"
        row(f"`python -c \"import mlk\"` (median of {imp['reps']}); frameworks loaded",
            f"{_ms(imp['import_mlk']['median_s'])}; {frameworks}",
            f"bare `python -c pass` {_ms(imp['bare_python']['median_s'])}",
            f"+{_ms(imp['import_cost_s'])} over bare",
            f"<= {GOAL_IMPORT_SECONDS * 1000:.0f} ms, no framework", imp["met"])
    comp = results.get("compose")
    if comp:
        row(f"compose + validate `+spec={comp['spec']}` (in-process, median of {comp['reps']})",
            f"{_ms(comp['mlk_load_spec']['median_s'])} (compose {_ms(comp['mlk_compose_only']['median_s'])}"
            f" + validate {_ms(comp['mlk_validate_only']['median_s'])})",
            f"Hydra initialize_config_dir + compose {_ms(comp['hydra_compose']['median_s'])}",
            f"{comp['ratio']:.2f} (CPU time {comp['ratio_cpu']:.2f}, minimums {comp['ratio_of_minimums']:.2f})",
            f"<= {GOAL_COMPOSE_RATIO}", comp["met"])
    tr = results.get("trials")
    if tr:
        mlk = tr["mlk"]
        mlk_cell = (f"{_ms(mlk['per_trial_s'])}/trial ({mlk['trials']} trials, "
                    f"search node {mlk['search_s']:.2f} s)")
        ray = tr.get("ray")
        if ray:
            d = ray["configs"]["default"]
            short = " (fewer trials: 500 would take > 10 min)" if d["trials"] < mlk["trials"] else ""
            row(f"per-trial overhead, no-op trial, 2 at a time: vs Ray Tune defaults, "
                f"{d['trials']} trials{short}",
                mlk_cell, f"{_ms(d['per_trial_s'])}/trial ({d['trials']} trials, {d['seconds']:.1f} s)",
                f"{tr['ratio_mlk_ray']:.3f}", f"<= {GOAL_RAY_RATIO}", tr["met"])
            r = ray["configs"]["reuse"]
            row(f"per-trial overhead: vs Ray Tune `reuse_actors=True`, {r['trials']} trials (extra)",
                mlk_cell,
                f"{_ms(r['per_trial_s'])}/trial ({r['trials']} trials, {r['seconds']:.1f} s)",
                f"{tr['ratio_mlk_ray_reuse']:.3f}", f"(<= {GOAL_RAY_RATIO})",
                tr["ratio_mlk_ray_reuse"] <= GOAL_RAY_RATIO)
            row("Ray: `ray.init(num_cpus=2, include_dashboard=False)` (excluded above)", "-",
                f"{ray['init_s']:.2f} s (import ray {ray['import_s']:.2f} s)", "-", "report", None)
        opt = tr["optuna"]
        row(f"per-trial overhead: vs Optuna in-process RandomSampler, {opt['trials']} trials", mlk_cell,
            f"{_ms(opt['per_trial_s'])}/trial ({opt['median_s']:.2f} s)", f"{tr['ratio_mlk_optuna']:.1f}",
            "report", None)
        row(f"mlk end to end in-process (load_spec + execute, {mlk['trials']} trials)",
            f"{mlk['end_to_end_s']:.2f} s (data node {mlk['runs'][-1]['nodes_s'].get('data', 0):.2f} s)",
            "-", "-", "report", None)
        cli_run = mlk.get("cli")
        if cli_run:
            row(f"`mlk run` CLI end to end, fresh process ({cli_run['requested']} trials)",
                f"{cli_run['end_to_end_s']:.2f} s (search {cli_run['search_s']:.2f} s = "
                f"{_ms(cli_run['per_trial_s'])}/trial)", "-", "-", "report", None)
    return rows


def markdown(rows: list[dict[str, str]]) -> str:
    lines = ["| measurement | mlk | peer | ratio | goal | met? |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['measurement']} | {r['mlk']} | {r['peer']} | {r['ratio']} | {r['goal']} | {r['met']} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="few repetitions and trials: a smoke test, not a measurement")
    p.add_argument("--only", nargs="+", choices=("cli", "import", "compose", "trials"),
                   help="run only these measurements")
    p.add_argument("--skip-ray", action="store_true", help="leave Ray Tune out of the per-trial comparison")
    p.add_argument("--ray-trials", type=int, default=None,
                   help="trials for Ray Tune with its defaults (default 150: ~1.5 s each here, "
                        "so 500 would take > 10 min)")
    p.add_argument("--output", type=Path, default=RESULTS,
                   help=f"where to write the JSON (default {RESULTS})")
    args = p.parse_args(argv)
    quick = args.quick
    only = set(args.only or ("cli", "import", "compose", "trials"))
    results: dict[str, Any] = {
        "command": "python -m benchmarks.kernel.run" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "quick": quick,
        "machine": machine(),
    }
    started = time.perf_counter()
    ray_trials = args.ray_trials or (4 if quick else 150)
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "cli": lambda: bench_cli(reps=2 if quick else 7),
        "import": lambda: bench_import(reps=2 if quick else 9),
        "compose": lambda: bench_compose(reps=3 if quick else 60),
        "trials": lambda: bench_trials(trials=20 if quick else 500, reps=1 if quick else 3,
                                       ray_default_trials=ray_trials, ray_reuse_trials=10 if quick else 500,
                                       skip_ray=args.skip_ray),
    }
    results["load_average"] = {}
    for name, step in steps.items():
        if name in only:
            before = load_average()
            results[name] = step()
            results["load_average"][name] = {"before": before, "after": load_average()}
    results["total_s"] = time.perf_counter() - started
    results["rows"] = table_rows(results)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    say(f"done in {results['total_s']:.0f}s; wrote {args.output}")
    print(markdown(results["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
