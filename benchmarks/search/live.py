"""Live mode: run a digits search for real and measure how much of the workers' time is training.

    python -m benchmarks.search.live [--spec digits_hb] [--override searcher.max_resource=81 ...]

Runs ``mlk run +spec=SPEC`` in-process (``load_spec`` + ``execute(spec, quiet=True)``) in a new,
temporary ``MLK_HOME`` with one change to the spec: ``framework.trial`` names :class:`TimedTrial`.
That class is the torch framework's own ``TorchTrial`` plus stopwatches. It trains exactly the
same way (same model, data, seeds and checkpoints) and records, for each trial request, an
``bench_request`` event in the run store with:

- ``start`` / ``end``: wall-clock time when ``TorchTrial.run`` began and returned in the worker;
- ``setup_s``: ``setup()`` (threads, data, model, optimiser) plus ``restore()`` (the checkpoint);
- ``train_s`` / ``eval_s``: per epoch, the time inside ``train_epoch`` and the val evaluation.

From the store the run is broken down over the search node's wall time W (``nodes.started`` to
``nodes.finished`` of ``search``) times the k workers, worker process by worker process:

- **pure training** = sum of ``train_s + eval_s`` over every epoch trained: what any tool has to
  spend to train and score these epochs;
- **report + checkpoint** = time inside ``TorchTrial.run`` that is neither setup nor training:
  ``ctx.report`` (a SQLite write) and saving a checkpoint when ``ctx.checkpoint_due`` (at each
  request's target with the default ``storage.checkpoint_every_s``; safetensors, checksums, the
  retention policy);
- **setup + restore** = ``setup_s`` of every request but each worker's first;
- **worker warm-up** = from the search node's start to each worker's first request, plus that
  request's ``setup_s``: starting the worker processes and the first imports (torch, scikit-learn);
  paid once per worker, not per trial;
- **dispatch gaps** = between the end of one request and the start of the next on the same worker:
  the kernel's turnaround (the result travels to the driver; tell, ask, SQLite bookkeeping and the
  searcher state are saved; the task goes back to a worker; ``run_trial`` opens the store, the
  registry and the framework) plus any wait for a searcher that has nothing to run now;
- **tail idle** = after each worker's last request until the search node ends (the other worker
  finishing the last trial, then shutting the pool down).

**overhead** = W x k / pure training - 1 (everything); **steady overhead** leaves out the worker
warm-up and the tail (pure + report/checkpoint + setup + gaps, over pure); **scheduler overhead**
= dispatch gaps / pure training. The goal is <= 5%.

Cross-check: for every epoch that is not the first of its request, the gap between its metrics
timestamp and the previous epoch's (both written by the kernel) must be about ``train_s + eval_s``
of that epoch; the median difference is reported (it holds the previous epoch's report, any
checkpoint saved then, and the loop's own bookkeeping). ``checkpoint_write_median_ms``
is the median time from an epoch's metrics row to its checkpoint row: writing the checkpoint.

Steps after the search (``compile``, ``validate``, ``deploy``) are switched off with ``compile=[]``
and ``deploy=[]``: they are not part of the search.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mlk_plugins.frameworks.torch import TorchTrial

TRIAL_CLASS = "benchmarks.search.live:TimedTrial"
#: The search is what is measured: steps after it (compile, validate, deploy) are switched off.
SEARCH_ONLY = ("compile=[]", "deploy=[]")
DEFAULT_RUNS = (
    ("digits_hb", ()),
    ("digits_asha", ()),
    ("digits_hb", ("searcher.max_resource=81",)),
)


def say(message: str) -> None:
    print(f"[live] {message}", file=sys.stderr, flush=True)


class TimedTrial(TorchTrial):  # type: ignore[misc, valid-type]
    """``TorchTrial`` with stopwatches; see the module docstring. Trains identically."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_s = 0.0
        self._train_s: list[float] = []
        self._eval_s: list[float] = []
        self._epochs: list[int] = []

    def setup(self) -> None:
        t0 = time.perf_counter()
        super().setup()
        self._setup_s += time.perf_counter() - t0

    def restore(self) -> int:
        t0 = time.perf_counter()
        try:
            return super().restore()
        finally:
            self._setup_s += time.perf_counter() - t0

    def train_epoch(self, epoch: int) -> float:
        t0 = time.perf_counter()
        try:
            return super().train_epoch(epoch)
        finally:
            self._train_s.append(time.perf_counter() - t0)
            self._epochs.append(epoch)

    def evaluate_split(self, split: str) -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            return super().evaluate_split(split)
        finally:
            if split == "val":
                self._eval_s.append(time.perf_counter() - t0)

    def run(self) -> None:
        start = time.time()
        super().run()
        end = time.time()
        self.ctx.store.add_event(self.ctx.run_id, "bench_request", {
            "trial_id": self.ctx.trial_id, "target": self.ctx.target, "start": start, "end": end, "pid": os.getpid(),
            "setup_s": self._setup_s, "epochs": self._epochs, "train_s": self._train_s, "eval_s": self._eval_s,
        })


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_live(spec_name: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the spec for real in a temporary MLK_HOME and break its search node down; see the docstring."""
    from mlk.runner import execute
    from mlk.spec import load_spec

    home = Path(tempfile.mkdtemp(prefix="mlk-bench-live-"))
    args = [f"+spec={spec_name}", f"framework.trial={TRIAL_CLASS}", *SEARCH_ONLY, *overrides]
    load_before = os.getloadavg()
    try:
        with environ(MLK_HOME=str(home)):
            t0 = time.perf_counter()
            spec = load_spec(args)
            run_id = execute(spec, quiet=True)
            total = time.perf_counter() - t0
        out = analyse(home / "mlk.db", run_id, int(spec.resources.max_concurrent_trials))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    out.update({"spec": spec_name, "overrides": list(overrides), "command": "mlk run " + " ".join(args),
                "end_to_end_s": total, "searcher": spec.searcher.model_dump(),
                "load_average": {"before": load_before, "after": os.getloadavg()}})
    return out


def analyse(db_path: Path, run_id: str, workers: int) -> dict[str, Any]:
    """The breakdown of the module docstring, from the run store (read directly, read-only)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        node = db.execute("SELECT started, finished FROM nodes WHERE run_id = ? AND node_id = 'search'",
                          (run_id,)).fetchone()
        events = [json.loads(r[0]) for r in db.execute(
            "SELECT payload_json FROM events WHERE run_id = ? AND kind = 'bench_request' ORDER BY id", (run_id,))]
        metrics = {(t, r): tm for t, r, tm in db.execute(
            "SELECT trial_id, resource, time FROM metrics WHERE run_id = ?", (run_id,))}
        ckpts = {(t, r): c for t, r, c in db.execute(
            "SELECT trial_id, resource, created FROM checkpoints WHERE run_id = ?", (run_id,))}
        trials = db.execute("SELECT COUNT(*), SUM(resource) FROM trials WHERE run_id = ?", (run_id,)).fetchone()
    finally:
        db.close()
    wall = node[1] - node[0]
    capacity = wall * workers
    train = sum(sum(e["train_s"]) for e in events)
    evaluate = sum(sum(e["eval_s"]) for e in events)
    pure = train + evaluate
    inside = sum(e["end"] - e["start"] for e in events)
    setup = sum(e["setup_s"] for e in events)
    epochs = sum(len(e["epochs"]) for e in events)
    # per worker process: start-up latency, gaps between its requests, idle tail after its last one
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        by_pid.setdefault(e["pid"], []).append(e)
    start_latency = gaps = tail = first_setup = 0.0
    for reqs in by_pid.values():
        reqs.sort(key=lambda e: e["start"])
        start_latency += reqs[0]["start"] - node[0]
        first_setup += reqs[0]["setup_s"]
        gaps += sum(b["start"] - a["end"] for a, b in itertools.pairwise(reqs))
        tail += node[1] - reqs[-1]["end"]
    report_ckpt = inside - setup - pure
    steady = pure + report_ckpt + (setup - first_setup) + gaps
    writes = [ckpts[k] - metrics[k] for k in metrics if k in ckpts]
    diffs = []
    for e in events:
        for i in range(1, len(e["epochs"])):
            ep = e["epochs"][i]
            if (e["trial_id"], ep) in metrics and (e["trial_id"], ep - 1) in metrics:
                gap = metrics[(e["trial_id"], ep)] - metrics[(e["trial_id"], ep - 1)]
                diffs.append(gap - e["train_s"][i] - e["eval_s"][i])
    return {
        "run_id": run_id, "workers": workers, "worker_processes": len(by_pid), "search_wall_s": wall,
        "capacity_s": capacity, "requests": len(events), "trials": trials[0], "epochs": epochs,
        "epochs_in_trials_table": trials[1],
        "pure_training_s": pure, "train_s": train, "eval_s": evaluate,
        "report_checkpoint_s": report_ckpt,
        "setup_restore_s": setup - first_setup,
        "worker_warmup_s": start_latency + first_setup,
        "dispatch_gaps_s": gaps,
        "tail_idle_s": tail,
        "unaccounted_s": capacity - (start_latency + inside + gaps + tail),
        "overhead": capacity / pure - 1 if pure else float("inf"),
        "overhead_steady": steady / pure - 1 if pure else float("inf"),
        "scheduler_overhead": gaps / pure if pure else float("inf"),
        "per_epoch_pure_ms": 1000 * pure / epochs if epochs else 0.0,
        "per_epoch_report_checkpoint_ms": 1000 * report_ckpt / epochs if epochs else 0.0,
        "per_request_setup_ms": 1000 * (setup - first_setup) / max(1, len(events) - len(by_pid)),
        "per_request_gap_ms": 1000 * gaps / max(1, len(events) - len(by_pid)),
        "checkpoint_write_median_ms": 1000 * statistics.median(writes) if writes else None,
        "checkpoints": len(writes),
        "timestamp_check_median_ms": 1000 * statistics.median(diffs) if diffs else None,
        "timestamp_check_epochs": len(diffs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search.live", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=None, help="one spec to run (default: digits_hb, digits_asha, and "
                                                "digits_hb with max_resource=81)")
    p.add_argument("--override", nargs="*", default=[], help="spec overrides, e.g. searcher.max_trials=8")
    args = p.parse_args(argv)
    runs = [(args.spec, tuple(args.override))] if args.spec else list(DEFAULT_RUNS)
    for spec, overrides in runs:
        out = run_live(spec, overrides)
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
