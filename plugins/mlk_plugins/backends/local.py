"""``local``: trials in worker processes on this machine (the default backend).

Each worker is a process with its own pipe to the driver: the driver sends a task down the pipe
and reads the result back, with nothing in between (no queue threads), so a one-epoch request
pays well under a millisecond for the round trip. Workers are forked from a clean fork server,
reused across trials (a framework is imported once per worker, not once per trial), ignore
Ctrl-C (the driver handles it) and are stopped with SIGTERM, which asks a running trial to save
and return, then SIGKILL after a grace period. Each worker watches the driver's PID: if the
driver is killed, the running trial stops after its epoch and the worker exits, so nothing is
left behind. A worker that dies turns its own task, and only that one, into a failed result; a
new worker takes its place at the next submit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready
from pathlib import Path
from typing import Any

from pydantic import Field

from mlk.backend import Backend
from mlk.sections import ResourcesConfig
from mlk.trial import TrialResult, TrialTask, run_trial, watch_driver

DIED = "the worker process running this trial died (killed, out of memory, or crashed)"


def death_message(exitcode: int | None, served: int, start_method: str) -> str:
    """Why a worker's task failed when the worker died: its exit code or signal, and for a worker that
    exited with an error before it returned anything, the usual cause."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"{DIED}: ended by {name}" + (" (SIGKILL: killed by hand or by the out-of-memory killer)"
                                             if exitcode == -signal.SIGKILL else "")
    if exitcode and not served and start_method in ("forkserver", "spawn"):
        return (f"the worker process exited with code {exitcode} before it ran any trial. With the "
                f"{start_method} start method every worker imports the main script again: if a script "
                "calls mlk (load_spec, execute), put those calls under `if __name__ == \"__main__\":`. "
                "The worker's error is in the output above")
    return DIED + (f": exit code {exitcode}" if exitcode is not None else "")


class LocalResources(ResourcesConfig):
    start_method: str = Field("forkserver", description="multiprocessing start method: forkserver, spawn or fork")
    stop_grace_seconds: float = Field(10.0, ge=0, description="how long a stopped trial may take to save and exit")


def _serve(conn: Connection, driver_pid: int) -> None:
    """A worker's life: run each task that comes down ``conn`` and send its result back; end when
    the driver sends None or closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_driver(driver_pid)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        result = run_trial(task)
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):  # the driver is gone or gave up on this worker
            return


class _Worker:
    """One worker process, the driver's end of its pipe, and the task it runs (None: idle)."""

    def __init__(self, ctx: Any, driver_pid: int) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_serve, args=(child, driver_pid), name="mlk-worker")
        self.process.start()
        child.close()
        self.task: TrialTask | None = None
        self.served = 0  # results returned

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


class LocalBackend(Backend):
    """Up to ``max_concurrent_trials`` worker processes, each fed through its own pipe."""

    name = "local"
    Config = LocalResources

    def __init__(self, config: LocalResources, home: Path) -> None:
        super().__init__(config, home)
        self.config: LocalResources = config
        self.workers: list[_Worker] = []
        self.pending: list[TrialTask] = []

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

    def prepare(self) -> None:
        """Start the fork server now: it imports the preload modules (torch, the dataset...) while
        the driver goes on; the first workers then fork from it warm."""
        if self.config.start_method == "forkserver":
            from multiprocessing import forkserver

            self._context()
            forkserver.ensure_running()

    def start(self) -> None:
        """Start the workers, so their start-up overlaps the first asks."""
        ctx = self._context()
        while len(self.workers) < self.config.max_concurrent_trials:
            self.workers.append(_Worker(ctx, os.getpid()))

    def submit(self, task: TrialTask) -> None:
        """Send ``task`` to an idle worker (starting one if fewer than ``max_concurrent_trials`` run);
        when all are busy it waits in a queue for the next one to free up."""
        self.pending.append(task)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.pending:
            worker = next((w for w in self.workers if w.task is None), None)
            if worker is None:
                if len(self.workers) >= self.config.max_concurrent_trials:
                    return
                worker = _Worker(self._context(), os.getpid())
                self.workers.append(worker)
            worker.task = self.pending.pop(0)
            try:
                worker.conn.send(worker.task)
            except (BrokenPipeError, OSError):
                pass  # the worker died while idle: wait() turns this task into a failed result

    def wait(self, timeout: float | None) -> list[TrialResult]:
        busy = [w for w in self.workers if w.task is not None]
        if not busy:
            return []
        waits: list[Any] = [w.conn for w in busy] + [w.process.sentinel for w in busy]
        ready = set(wait_ready(waits, timeout=timeout))
        results = []
        for w in busy:
            if w.conn not in ready and w.process.sentinel not in ready:
                continue
            task, w.task = w.task, None
            assert task is not None
            try:
                results.append(w.conn.recv())  # a result sent just before the worker exited still counts
                w.served += 1
            except (EOFError, OSError):
                self._discard(w)
                error = death_message(w.process.exitcode, w.served, self.config.start_method)
                results.append(TrialResult(task.trial_id, 0, error=error))
        self._dispatch()
        return results

    def _discard(self, worker: _Worker) -> None:
        worker.close()
        worker.process.join(1)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(5)
        self.workers.remove(worker)

    @staticmethod
    def _drain(worker: _Worker, deadline: float) -> None:
        """Read and drop the result a stopped worker sends after its save, then let it exit."""
        while worker.process.is_alive() and time.time() < deadline:
            if not worker.conn.poll(0.05):
                continue
            try:
                worker.conn.recv()
                worker.conn.send(None)
            except (EOFError, OSError):
                pass
            return

    def shutdown(self) -> None:
        """Idle workers are told to exit; running trials get SIGTERM (save and return), then
        SIGKILL after ``stop_grace_seconds``."""
        workers, self.workers = self.workers, []
        self.pending.clear()
        for w in workers:
            if w.task is None:
                try:
                    w.conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
            elif w.process.is_alive():
                w.process.terminate()
        deadline = time.time() + self.config.stop_grace_seconds
        for w in workers:
            if w.task is not None:
                self._drain(w, deadline)
            w.process.join(max(0.0, deadline - time.time()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)
            w.close()
