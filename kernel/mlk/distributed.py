"""Data-parallel trials: ``resources.slots_per_trial: N`` runs one trial on N worker processes.

The worker the backend gave the trial becomes a supervisor: it starts N *rank* processes
(``python -m mlk.distributed``), each running the same framework ``train`` with
``ctx.distributed`` set to a :class:`Distributed` (plain data: rank, world size, address, ports,
collective backend), and waits. Rank 0 reports and saves checkpoints; the other ranks train.
The framework wires its own data parallelism from ``ctx.distributed`` (torch DDP, Lightning's
DDP strategy, TensorFlow's MultiWorkerMirroredStrategy, ``jax.distributed``) and declares
``max_slots``.

A rank that dies or fails makes the supervisor kill the others at once (a peer blocked in a
collective would otherwise wait for its timeout) and return a failed result, which the search
retries from the trial's last checkpoint. Ranks die with their supervisor (``PR_SET_PDEATHSIG``
and a parent watch), and a stop request (SIGTERM, or the driver gone) is passed on to every rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlk.trial import TrialResult, TrialTask

#: Loopback only: every rank of a local trial runs on this machine.
LOCAL_ADDR = "127.0.0.1"


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a data-parallel trial; plain data for any framework.

    Attributes:
        rank: this process, 0 .. world_size - 1; rank 0 reports and saves checkpoints.
        world_size: processes training the trial together.
        addr: the rendezvous host (``127.0.0.1`` for local trials).
        port: a free TCP port on ``addr`` for the rendezvous (torch's ``MASTER_PORT``, JAX's
            coordinator).
        worker_ports: one more free port per rank, for frameworks whose every worker listens
            (TensorFlow's ``TF_CONFIG`` cluster); ``worker_ports[rank]`` is this process's.
        backend: the collective library torch should use: ``gloo`` on CPU, ``nccl`` with GPUs.
        local_rank: this process's index on its machine (its GPU, when there are GPUs).
    """

    rank: int
    world_size: int
    addr: str
    port: int
    worker_ports: tuple[int, ...] = field(default=())
    backend: str = "gloo"
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def init_method(self) -> str:
        """``tcp://addr:port``, for ``torch.distributed.init_process_group``."""
        return f"tcp://{self.addr}:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment variables torch's ``env://`` rendezvous and Lightning read."""
        return {"MASTER_ADDR": self.addr, "MASTER_PORT": str(self.port), "RANK": str(self.rank),
                "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.world_size), "NODE_RANK": "0", "GROUP_RANK": "0"}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "worker_ports": list(self.worker_ports)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Distributed:
        return cls(**{**data, "worker_ports": tuple(data.get("worker_ports", ()))})


def free_ports(n: int, host: str = LOCAL_ADDR) -> list[int]:
    """``n`` distinct TCP ports free on ``host`` right now (all sockets held until all are found)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def collective_backend() -> str:
    """``nccl`` when this process sees NVIDIA GPUs, else ``gloo``; decided without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return "gloo"
    return "nccl" if Path("/dev/nvidia0").exists() else "gloo"


def layout(world_size: int) -> list[Distributed]:
    """One :class:`Distributed` per rank of a local trial, with fresh ports."""
    ports = free_ports(world_size + 1)
    backend = collective_backend()
    return [Distributed(rank=r, world_size=world_size, addr=LOCAL_ADDR, port=ports[0],
                        worker_ports=tuple(ports[1:]), backend=backend, local_rank=r)
            for r in range(world_size)]


# -- the supervisor (the backend's worker) ------------------------------------------------------------


class _Ranks:
    """The rank processes of one trial request, started and watched by the supervisor."""

    def __init__(self, task: TrialTask, world_size: int, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        task_file = folder / "task.json"
        task_file.write_text(json.dumps(asdict(task), default=str))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        if collective_backend() == "gloo" and sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # rendezvous and gloo pairs stay on loopback
        for dist in layout(world_size):
            log = folder / f"rank{dist.rank}.log"
            self.logs.append(log)
            with open(log, "wb") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "mlk.distributed", str(task_file), json.dumps(dist.to_dict()),
                     str(folder / f"result{dist.rank}.json"), str(os.getpid())],
                    env={**env, **dist.env()}, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                ))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def kill_all(self) -> None:
        self.signal_all(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def result(self, rank: int) -> dict[str, Any] | None:
        path = self.folder / f"result{rank}.json"
        return dict(json.loads(path.read_text())) if path.is_file() else None

    def log_tail(self, rank: int, lines: int = 30) -> str:
        try:
            text = self.logs[rank].read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def run_distributed(task: TrialTask, world_size: int,
                    should_stop: Callable[[], bool] | None = None) -> TrialResult:
    """Run ``task`` on ``world_size`` rank processes and return rank 0's result; never raises.

    A stop (``should_stop()`` true: SIGTERM, or the driver's death) is passed on to the ranks as SIGTERM, which
    asks each to stop after its epoch. Any rank that fails or dies fails the request and the other
    ranks are killed, so no process is left waiting in a collective.
    """
    from mlk.trial import TrialResult

    started = time.time()
    folder = Path(tempfile.mkdtemp(prefix=f"mlk-ddp-{task.trial_id}-"))
    ranks: _Ranks | None = None
    try:
        ranks = _Ranks(task, world_size, folder)
        forwarded = False
        while True:
            codes = [p.poll() for p in ranks.procs]
            # A rank killed by a signal is the cause; its peers' errors ("connection closed") follow.
            failed = sorted((r for r, c in enumerate(codes) if c not in (None, 0)),
                            key=lambda r: (int(codes[r] or 0) >= 0, r))
            if failed:
                ranks.kill_all()
                return _failure(task, ranks, failed[0], codes[failed[0]] or 0, world_size, started)
            if all(c == 0 for c in codes):
                break
            if should_stop is not None and not forwarded and should_stop():
                ranks.signal_all(signal.SIGTERM)
                forwarded = True
            time.sleep(0.05)
        out = ranks.result(0)
        if out is None:
            return TrialResult(task.trial_id, 0, error="rank 0 ended without writing its result",
                               seconds=time.time() - started)
        return TrialResult(**{**out, "seconds": time.time() - started})
    except Exception as e:  # the launch itself failed (no free port, no interpreter)
        if ranks is not None:
            ranks.kill_all()
        return TrialResult(task.trial_id, 0, error=f"could not run the trial on {world_size} processes: "
                           f"{type(e).__name__}: {e}", seconds=time.time() - started)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def _failure(task: TrialTask, ranks: _Ranks, rank: int, code: int, world_size: int,
             started: float) -> TrialResult:
    from mlk.trial import TrialResult

    own = ranks.result(rank)
    if own is not None and own.get("error"):
        return TrialResult(**{**own, "resource": 0, "seconds": time.time() - started,
                              "error": f"rank {rank} of {world_size}: {own['error']}"})
    tail = ranks.log_tail(rank)
    return TrialResult(task.trial_id, 0, seconds=time.time() - started,
                       error=f"rank {rank} of {world_size} {_exit_text(code)}; the other ranks were stopped"
                       + (f"\n{tail}" if tail else ""))


# -- a rank process -------------------------------------------------------------------------------------


def _die_with(parent: int) -> None:
    """Make this process die when ``parent`` (the supervisor) does, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="mlk-supervisor-watch", daemon=True).start()


def rank_main(argv: list[str]) -> int:
    """Entry point of a rank process: ``python -m mlk.distributed TASK.json DIST RESULT.json PARENT``."""
    from mlk.trial import TrialTask, run_trial

    task_file, dist_json, result_file, parent = argv
    _die_with(int(parent))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the driver, which stops the supervisor
    task = TrialTask(**json.loads(Path(task_file).read_text()))
    dist = Distributed.from_dict(json.loads(dist_json))
    result = run_trial(task, distributed=dist)
    tmp = Path(result_file + ".partial")
    tmp.write_text(json.dumps(asdict(result), default=str))
    os.replace(tmp, result_file)
    sys.stdout.flush()
    sys.stderr.flush()
    return 0 if result.error is None else 3


if __name__ == "__main__":
    # Run the copy imported as ``mlk.distributed``, so the classes are the ones the kernel imports.
    from mlk.distributed import rank_main as _rank_main

    sys.exit(_rank_main(sys.argv[1:]))
