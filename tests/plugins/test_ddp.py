"""One switch to distributed: ``resources.slots_per_trial: 2`` trains a trial on two real rank
processes (gloo on CPU) with the model code unchanged.

Replicas hold identical weights after every step, two ranks match one rank on the same global
batch, a killed rank fails the trial with no process left behind, and the retry resumes from the
checkpoint. The trial classes below run inside the rank processes (they import this module).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from safetensors.torch import load_file  # noqa: E402
from tests.conftest import mlk  # noqa: E402
from tests.plugins.digits_trials import digits_task  # noqa: E402

from mlk.distributed import Distributed, free_ports, layout  # noqa: E402
from mlk.store import RunStore  # noqa: E402
from mlk.trial import TrialResult, run_trial  # noqa: E402
from mlk_plugins.frameworks.torch import TorchTrial, ddp  # noqa: E402

#: Relative tolerance of two ranks against one on the same global batches: only the order of
#: floating-point sums differs (each rank's mean gradient, weighted, then summed).
TOLERANCE = 1e-5
SPY_DIR = "MLK_TEST_DDP_DIR"


# -- trial classes the rank processes load (framework.trial) -------------------------------------------


class DigestTrial(TorchTrial):
    """Writes, per rank, the sha256 of every parameter after each optimisation step, and its PID."""

    def setup(self) -> None:
        super().setup()
        self.digests: list[str] = []
        self._spy("pid", os.getpid())

    def _spy(self, what: str, value: Any) -> None:
        folder = os.environ.get(SPY_DIR)
        if folder:
            rank = self.place.rank if self.place is not None else 0
            name = f"{what}-{self.ctx.task.attempt}-{rank}.json"
            tmp = Path(folder) / (name + ".partial")
            tmp.write_text(json.dumps(value))
            tmp.replace(Path(folder) / name)

    def train_batch(self, inputs: Any, targets: Any) -> float:
        loss = super().train_batch(inputs, targets)
        self.digests.append(ddp.parameter_digest(self.model))
        return loss

    def train_epoch(self, epoch: int) -> float:
        loss = super().train_epoch(epoch)
        self._spy(f"digests-e{epoch}", self.digests)
        return loss


class KilledRankTrial(DigestTrial):
    """Rank 1 is SIGKILLed in the middle of epoch 2 on the first attempt, as by the OOM killer."""

    def train_batch(self, inputs: Any, targets: Any) -> float:
        if (self.epoch == 2 and self.place is not None and self.place.rank == 1 and self.ctx.task.attempt == 0
                and len(self.digests) > 16):  # a few steps into epoch 2 (13 steps an epoch)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().train_batch(inputs, targets)


# -- helpers -----------------------------------------------------------------------------------------------


def run(home: Path, run_id: str, *, slots: int, target: int, trial: str | None = None, batch_size: int = 31,
        framework: str = "torch", attempt: int = 0) -> tuple[TrialResult, RunStore]:
    """One real trial request of the digits MLP (no dropout, so ranks draw nothing random)."""
    task, store = digits_task(home, run_id, framework=framework, slots=slots, target=target, batch_size=batch_size,
                              trial=f"{__name__}:{trial}" if trial else None, attempt=attempt)
    return run_trial(task), store


def metrics(store: RunStore, run_id: str) -> dict[int, dict[str, float]]:
    return {m["resource"]: m["metrics"] for m in store.metrics(run_id, 1)}


def weights(store: RunStore, home: Path, run_id: str) -> dict[str, Any]:
    ckpt = store.checkpoints(run_id, 1)[-1]
    folder = Path(ckpt["uri"].removeprefix("file://"))
    return load_file(str(folder / "model.safetensors"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two epochs on one process and on two ranks, with per-step parameter digests of every rank."""
    home = tmp_path_factory.mktemp("ddp-home")
    spy = tmp_path_factory.mktemp("ddp-spy")
    os.environ[SPY_DIR] = str(spy)
    try:
        one, store = run(home, "one", slots=1, target=2)
        two, store = run(home, "two", slots=2, target=2, trial="DigestTrial")
    finally:
        del os.environ[SPY_DIR]
    return {"home": home, "spy": spy, "one": one, "two": two, "store": store}


# -- plain data ----------------------------------------------------------------------------------------------


def test_distributed_is_plain_data_on_loopback() -> None:
    ranks = layout(3)
    assert [d.rank for d in ranks] == [0, 1, 2] and {d.world_size for d in ranks} == {3}
    assert {d.addr for d in ranks} == {"127.0.0.1"} and len({d.port for d in ranks}) == 1
    ports = {ranks[0].port, *ranks[0].worker_ports}
    assert len(ports) == 4  # the rendezvous port and one per worker, all distinct
    assert ranks[0].backend == "gloo"  # no GPU on this machine
    again = Distributed.from_dict(json.loads(json.dumps(ranks[1].to_dict())))
    assert again == ranks[1] and not again.is_main and ranks[0].is_main
    env = ranks[2].env()
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["RANK"] == "2" and env["WORLD_SIZE"] == "3"
    assert ranks[0].init_method == f"tcp://127.0.0.1:{ranks[0].port}"
    import socket

    for port in free_ports(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free indeed


def test_shards_cover_the_global_batch_in_order() -> None:
    batch = torch.arange(31)
    parts = [ddp.shard(batch, r, 2) for r in range(2)]
    assert [len(p) for p in parts] == ddp.shard_sizes(31, 2) == [16, 15]
    assert torch.equal(torch.cat(parts), batch)
    assert ddp.shard_sizes(1, 2) == [1, 0] and len(ddp.shard(torch.arange(1), 1, 2)) == 0


# -- real data-parallel training --------------------------------------------------------------------------


def test_replicas_hold_identical_weights_after_every_step(reference: dict[str, Any]) -> None:
    assert reference["two"].error is None, reference["two"].error
    spy = reference["spy"]
    per_rank = [json.loads((spy / f"digests-e2-0-{r}.json").read_text()) for r in (0, 1)]
    steps_per_epoch = -(-400 // 31)
    assert len(per_rank[0]) == 2 * steps_per_epoch
    assert per_rank[0] == per_rank[1]
    assert len(set(per_rank[0])) == len(per_rank[0])  # the weights moved at every step


def test_two_ranks_match_one_on_the_same_global_batch(reference: dict[str, Any]) -> None:
    store, home = reference["store"], reference["home"]
    one, two = metrics(store, "one"), metrics(store, "two")
    assert sorted(one) == sorted(two) == [1, 2]
    for epoch in (1, 2):
        for key, value in one[epoch].items():
            assert two[epoch][key] == pytest.approx(value, rel=TOLERANCE), (epoch, key)
    w1, w2 = weights(store, home, "one"), weights(store, home, "two")
    assert w1.keys() == w2.keys()
    for name in w1:
        assert torch.allclose(w1[name], w2[name], rtol=TOLERANCE, atol=1e-6), name
    # Only rank 0 recorded: one report and one checkpoint row per epoch.
    assert [m["resource"] for m in store.metrics("two", 1)] == [1, 2]
    assert two[2]["val_accuracy"] > 0.5  # it learned (chance: 0.1)


def test_a_killed_rank_fails_the_trial_and_leaves_no_process(reference: dict[str, Any], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    home = reference["home"]
    spy = tmp_path / "spy"
    spy.mkdir()
    monkeypatch.setenv(SPY_DIR, str(spy))
    started = time.time()
    failed, store = run(home, "killed", slots=2, target=2, trial="KilledRankTrial")
    assert failed.error is not None and not failed.user_error
    assert "rank 1 of 2 was killed by SIGKILL" in failed.error
    assert time.time() - started < 300
    pids = [json.loads((spy / f"pid-0-{r}.json").read_text()) for r in (0, 1)]
    assert not any(alive(p) for p in pids), "every rank of the failed trial is gone"
    # Epoch 1 was recorded and checkpointed; epoch 2 never was.
    assert sorted(metrics(store, "killed")) == [1]
    assert [c["resource"] for c in store.checkpoints("killed", 1)] == [1]

    retried, store = run(home, "killed", slots=2, target=2, trial="KilledRankTrial", attempt=1)
    assert retried.error is None, retried.error
    assert retried.resource == 2
    assert not (spy / "digests-e1-1-0.json").exists()  # the retry resumed after epoch 1
    # Resumed from the checkpoint, the trial ends exactly where the uninterrupted one did.
    assert metrics(store, "killed") == metrics(reference["store"], "two")
    assert not any(alive(json.loads((spy / f"pid-1-{r}.json").read_text())) for r in (0, 1))


def test_ranks_die_with_their_supervisor(tmp_path: Path) -> None:
    """SIGKILL the process supervising a two-rank trial: both ranks exit on their own."""
    spy = tmp_path / "spy"
    spy.mkdir()
    code = ("import sys; from pathlib import Path; from tests.plugins.test_ddp import run; "
            "run(Path(sys.argv[1]), 'orphan', slots=2, target=3, trial='DigestTrial')")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, SPY_DIR: str(spy),
           "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    supervisor = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "home")], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not all((spy / f"pid-0-{r}.json").exists() for r in (0, 1)):
            assert supervisor.poll() is None, "the supervisor ended before its ranks started"
            time.sleep(0.2)
        pids = [json.loads((spy / f"pid-0-{r}.json").read_text()) for r in (0, 1)]
    finally:
        supervisor.kill()
        supervisor.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def test_a_stop_request_stops_every_rank_after_the_same_epoch(tmp_path: Path) -> None:
    """SIGTERM to the supervisor (what the local backend sends at shutdown) reaches both ranks; they
    agree on the epoch to stop after, rank 0 saves it, and the request ends without error."""
    spy = tmp_path / "spy"
    spy.mkdir()
    code = ("import sys, json; from pathlib import Path; from tests.plugins.test_ddp import run; "
            "r, _ = run(Path(sys.argv[1]), 'stopped', slots=2, target=40, trial='DigestTrial'); "
            "print(json.dumps({'error': r.error, 'resource': r.resource}))")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, SPY_DIR: str(spy),
           "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    supervisor = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "home")], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (spy / "digests-e1-0-0.json").exists():
            assert supervisor.poll() is None, "the supervisor ended before epoch 1"
            time.sleep(0.1)
        supervisor.send_signal(signal.SIGTERM)
        out, _ = supervisor.communicate(timeout=120)
    finally:
        supervisor.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["error"] is None and 1 <= result["resource"] < 40
    store = RunStore(tmp_path / "home")
    assert sorted(metrics(store, "stopped")) == list(range(1, result["resource"] + 1))
    assert store.checkpoints("stopped", 1)[-1]["resource"] == result["resource"]
    epochs = [max(int(p.name.split("-")[1][1:]) for p in spy.glob(f"digests-*-0-{r}.json")) for r in (0, 1)]
    assert epochs == [result["resource"]] * 2  # both ranks stopped after the same epoch
    pids = [json.loads((spy / f"pid-0-{r}.json").read_text()) for r in (0, 1)]
    assert not any(alive(p) for p in pids)


@pytest.mark.slow
def test_lightning_two_ranks_match_one(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    one, store = run(tmp_path, "one", slots=1, target=2, framework="lightning")
    two, store = run(tmp_path, "two", slots=2, target=2, framework="lightning")
    assert one.error is None and two.error is None, (one.error, two.error)
    m1, m2 = metrics(store, "one"), metrics(store, "two")
    assert sorted(m1) == sorted(m2) == [1, 2]
    for epoch in (1, 2):
        for key, value in m1[epoch].items():
            assert m2[epoch][key] == pytest.approx(value, rel=TOLERANCE), (epoch, key)


@pytest.mark.slow
def test_one_switch_runs_a_search_data_parallel(workdir: Path) -> None:
    proc = mlk("run", "+spec=digits_random", "resources.slots_per_trial=2", "resources.max_concurrent_trials=1",
               "searcher.max_trials=2", "searcher.max_resource=2", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(mlk("runs", "list", "--json", cwd=workdir).stdout)
    show = json.loads(mlk("runs", "show", runs[0]["id"], "--json", cwd=workdir).stdout)
    assert [t["status"] for t in show["trials"]] == ["completed", "completed"]
    assert show["summary"]["best_metrics"]["val_accuracy"] > 0.8
    assert show["framework_flags"]["flags"]["torch.use_deterministic_algorithms"] is True
