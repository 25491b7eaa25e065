"""``local``: trials in a pool of worker processes on this machine (the default backend).

Workers are forked from a clean fork server, reused across trials (a framework is imported once
per worker, not once per trial), ignore Ctrl-C (the driver handles it) and are stopped with
SIGTERM, which asks a running trial to save and return, then SIGKILL after a grace period.
Each worker watches the driver's PID: if the driver is killed, the running trial stops after its
epoch and the worker exits, so nothing is left behind.
A worker that dies turns its task into a failed result; the pool is rebuilt for the next task.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from pydantic import Field

from mlk.backend import Backend
from mlk.sections import ResourcesConfig
from mlk.trial import TrialResult, TrialTask, run_trial, watch_driver


class LocalResources(ResourcesConfig):
    start_method: str = Field("forkserver", description="multiprocessing start method: forkserver, spawn or fork")
    stop_grace_seconds: float = Field(10.0, ge=0, description="how long a stopped trial may take to save and exit")


def _worker_init(driver_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_driver(driver_pid)


class LocalBackend(Backend):
    """Up to ``max_concurrent_trials`` worker processes."""

    name = "local"
    Config = LocalResources

    def __init__(self, config: LocalResources, home: Path) -> None:
        super().__init__(config, home)
        self.config: LocalResources = config
        self.pool: ProcessPoolExecutor | None = None
        self.futures: dict[Future[TrialResult], TrialTask] = {}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "start_method": self.config.start_method,
                "workers": self.config.max_concurrent_trials}

    def _context(self) -> Any:
        ctx = mp.get_context(self.config.start_method)
        if self.config.start_method == "forkserver":
            # the framework and dataset modules too: imported once in the server, not once per worker
            # (it reads this list when it starts: the first search of a driver process sets it)
            ctx.set_forkserver_preload(["mlk.trial", "mlk.registry", "mlk.store", *self.preload_modules])
        return ctx

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=self.config.max_concurrent_trials, mp_context=self._context(),
                                            initializer=_worker_init, initargs=(os.getpid(),))
        return self.pool

    def prepare(self) -> None:
        """Start the fork server now: it imports the preload modules (torch, the dataset...) while
        the driver goes on; the first workers then fork from it warm."""
        if self.config.start_method == "forkserver":
            from multiprocessing import forkserver

            self._context()
            forkserver.ensure_running()

    def start(self) -> None:
        self._pool()

    def submit(self, task: TrialTask) -> None:
        try:
            fut = self._pool().submit(run_trial, task)
        except BrokenProcessPool:
            self._discard_pool()
            fut = self._pool().submit(run_trial, task)
        self.futures[fut] = task

    def wait(self, timeout: float | None) -> list[TrialResult]:
        if not self.futures:
            return []
        done, _ = wait_futures(list(self.futures), timeout=timeout, return_when=FIRST_COMPLETED)
        results = []
        broken = False
        for fut in done:
            task = self.futures.pop(fut)
            try:
                results.append(fut.result())
            except BrokenProcessPool:
                broken = True
                results.append(TrialResult(task.trial_id, 0, error="the worker process running this trial died "
                                           "(killed, out of memory, or crashed)"))
            except Exception as e:
                results.append(TrialResult(task.trial_id, 0, error=f"{type(e).__name__}: {e}"))
        if broken:
            self._discard_pool()
        return results

    def _discard_pool(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def shutdown(self) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        procs = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.time() + self.config.stop_grace_seconds
        for p in procs:
            p.join(max(0.0, deadline - time.time()))
            if p.is_alive():
                p.kill()
                p.join(5)
        self.futures.clear()
