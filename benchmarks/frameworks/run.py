"""Epoch time of the torch and lightning frameworks through mlk against each one's idiomatic loop,
and data-parallel throughput on 2 workers against 1.

For each framework and model (the digits MLP on sklearn's digits; the CIFAR CNN on a small real
image set in CIFAR-10's format, made from the digits by :mod:`benchmarks.frameworks.cifar_format`)
it trains the same model, data, batch size and optimiser for ``EPOCHS`` epochs:

- **mlk**: a trial through ``mlk.trial.run_trial`` (the framework plugin's loop, reporting to the
  run store every epoch and checkpointing through the storage plugin when ``ctx.checkpoint_due``:
  with the default ``storage.checkpoint_every_s`` once, at the request's target);
- **idiomatic**: a plain torch loop (``randperm`` batches, ``Adam``, an eval pass per epoch), or
  ``Trainer.fit`` on a LightningModule with DataLoaders (Lightning's default per-epoch checkpoint on).

The two sides run in lockstep (:mod:`benchmarks.frameworks.lockstep`): one mlk epoch, then one
epoch of the own loop, then the next mlk epoch..., in one process, ``REPEATS[model]`` times, the
sides swapping threads (main and helper) and who goes first every repeat. An
epoch's time is from its side's turn to its end (the first epoch, with its warm-up, is left out);
the mean epoch time adds, for mlk, the request's final checkpoint after its last report. Reported:
the medians and their ratio, and the **paired ratio**, the median over every epoch pair of mlk's
epoch / the own loop's epoch after it, on which the goal is judged: this machine's speed drifts by
up to +-20 % within minutes, and a pair is seconds apart. One thread each, deterministic algorithms
on both sides.

Data parallel: the same mlk trial with ``resources.slots_per_trial`` 1 and 2 (one thread per
worker, so 2 workers use both cores), alternated; throughput is training examples per second of
epoch time; the ideal is 2x.

Run: ``python -m benchmarks.frameworks.run`` (``--quick`` for a smoke run). It then runs
:mod:`benchmarks.frameworks.keras_jax` when that module is there (``--no-keras-jax`` skips it).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlk.hookspecs import hookimpl

if TYPE_CHECKING:
    from benchmarks.frameworks.lockstep import Lockstep

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
THREADS = 1
GOAL = 1.05
#: Epochs per run. Each epoch after the first is paired with the own loop's; a digits epoch lasts
#: ~20 ms and this machine's speed varies by +-30 % between such epochs, so digits needs hundreds of
#: pairs for a median within a point or two (40 epochs x 9 repeats: 351), CIFAR (~3.5 s) tens.
EPOCHS = {"digits_mlp": 40, "cifar_cnn": 6}
DDP_EPOCHS = {"digits_mlp": 6, "cifar_cnn": 4}
#: Repeats per model, each giving EPOCHS - 1 epoch pairs.
REPEATS = {"digits_mlp": 9, "cifar_cnn": 5}
DDP_REPEATS = 3
BATCH = 32
DDP_BATCH = 64
LR = 1e-3


def sections(framework: str, model: str, data: dict[str, Any], batch: int = BATCH) -> dict[str, Any]:
    return {
        "framework": {"name": framework, "optimizer": "adam", "lr": LR, "batch_size": batch},
        "data": data,
        "model": {"name": model, **({"dropout": 0.1} if model == "digits_mlp" else {})},
        "searcher": {"name": "single", "metric": "val_loss", "max_resource": 100},
    }


def epoch_times(ends: list[float], finished: float | None = None) -> dict[str, float]:
    """``epoch_s``: the median gap between consecutive epoch ends; ``mean_epoch_s``: from the first
    end to ``finished`` (default the last end) over the epochs in between."""
    last = ends[-1] if finished is None else finished
    return {"epoch_s": statistics.median(b - a for a, b in itertools.pairwise(ends)),
            "mean_epoch_s": (last - ends[0]) / (len(ends) - 1)}


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# -- mlk ------------------------------------------------------------------------------------------------


class _HandOver:
    """An ``mlk.hooks`` plugin that ends mlk's turn at each report (lockstep)."""

    def __init__(self, turn: Lockstep) -> None:
        self.turn = turn

    @hookimpl
    def mlk_trial_reported(self, run_id: str, trial_id: int, resource: int, metrics: dict[str, float]) -> None:
        self.turn.end_epoch("mlk")


def through_mlk(framework: str, model: str, data: dict[str, Any], epochs: int, slots: int = 1,
                batch: int = BATCH, turn: Lockstep | None = None) -> dict[str, Any]:
    """One trial of ``epochs`` through ``run_trial``; with ``turn``, in lockstep with an own loop."""
    from mlk.registry import registry
    from mlk.sections import StorageConfig

    extra: dict[str, Any] = {}
    if turn is not None:
        # The trial's wall clock also runs while the own loop has the turn: twice the checkpoint
        # interval keeps the saves those of a run alone.
        every = StorageConfig.model_fields["checkpoint_every_s"].default
        extra["storage"] = {"checkpoint_every_s": 2 * every}
        registry().register(_HandOver(turn), name="bench-lockstep")
    try:
        return _trial(framework, model, data, epochs, slots, batch, extra)
    finally:
        if turn is not None:
            registry().pm.unregister(name="bench-lockstep")


def _trial(framework: str, model: str, data: dict[str, Any], epochs: int, slots: int, batch: int,
           extra: dict[str, Any]) -> dict[str, Any]:
    from mlk.store import RunStore
    from mlk.testing import build_spec
    from mlk.trial import TrialTask, run_trial

    with tempfile.TemporaryDirectory(prefix="mlk-bench-fw-") as tmp:
        home = Path(tmp)
        spec = build_spec({**sections(framework, model, data, batch), "resources": {"slots_per_trial": slots},
                           "reproducibility": {"deterministic": True}, **extra}, home)
        store = RunStore(home)
        store.create_run("bench", "bench", spec.hash, spec.data)
        store.upsert_trial("bench", 1, {}, 0, "running", epochs)
        task = TrialTask(run_id="bench", trial_id=1, hparams={}, seed=0, target=epochs, spec=spec.data,
                         home=str(home), threads=THREADS)
        result = run_trial(task)
        if result.error:
            raise RuntimeError(result.error)
        ends = [r["time"] for r in store.db.execute(
            "SELECT time FROM metrics WHERE run_id = 'bench' ORDER BY resource").fetchall()]
        (saved,) = store.db.execute(
            "SELECT created FROM checkpoints WHERE run_id = 'bench' AND resource = ?", (epochs,)).fetchone()
        store.close()
    # From the last epoch's report to its checkpoint row: writing, hashing and storing the checkpoint.
    return {**epoch_times(ends, saved), "checkpoint_s": saved - ends[-1],
            "val_accuracy": result.metrics["val_accuracy"]}


# -- the frameworks' own loops ------------------------------------------------------------------------------


def load(data: dict[str, Any]) -> Any:
    from mlk.registry import registry
    from mlk.trial import load_dataset

    return load_dataset(registry(), data)


def build(framework: str, model: str, meta: dict[str, Any]) -> Any:
    from mlk.registry import registry
    from mlk.trial import build_model

    return build_model(registry(), sections(framework, model, {})["model"], framework, meta)


def _tensors(split: Any) -> tuple[Any, Any]:
    import torch

    return torch.as_tensor(split[0], dtype=torch.float32), torch.as_tensor(split[1], dtype=torch.int64)


#: What an own loop calls at each epoch's end (the lockstep's hand-over, which times the epoch).
Stamp = Callable[[], float]


def torch_loop(model: str, data: dict[str, Any], epochs: int, stamp: Stamp) -> dict[str, Any]:
    """The loop a PyTorch user writes: shuffle, step, evaluate."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    splits = load(data)
    (x, y), (xv, yv) = _tensors(splits.train), _tensors(splits.val)
    torch.manual_seed(0)
    net = build("torch", model, splits.meta)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    accuracy = 0.0
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(y)).split(BATCH):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(xb).argmax(1) == yb).sum()) for xb, yb in zip(xv.split(512), yv.split(512)))
        accuracy = correct / len(yv)
        stamp()
    return {"val_accuracy": accuracy}


def lightning_fit(model: str, data: dict[str, Any], epochs: int, stamp: Stamp) -> dict[str, Any]:
    """``Trainer.fit`` as its documentation shows it: a LightningModule, DataLoaders, default callbacks."""
    import logging
    import warnings

    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(THREADS)
    splits = load(data)
    torch.manual_seed(0)
    net = build("torch", model, splits.meta)

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_accuracy", (self.net(x).argmax(1) == y).float().mean(), on_epoch=True)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=LR)

    callback = pl.callbacks.LambdaCallback(on_train_epoch_end=lambda *_: stamp())
    with tempfile.TemporaryDirectory(prefix="mlk-bench-pl-") as root:
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, deterministic=True, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                             default_root_dir=root, num_sanity_val_steps=0)
        train = DataLoader(TensorDataset(*_tensors(splits.train)), batch_size=BATCH, shuffle=True)
        val = DataLoader(TensorDataset(*_tensors(splits.val)), batch_size=512)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Classifier(), train, val)
    return {"val_accuracy": float(trainer.callback_metrics["val_accuracy"])}


IDIOMATIC = {"torch": ("plain torch loop", torch_loop), "lightning": ("Trainer.fit", lightning_fit)}


# -- the benchmark -------------------------------------------------------------------------------------------


def datasets(root: Path, quick: bool) -> dict[str, dict[str, Any]]:
    from benchmarks.frameworks.cifar_format import write_archive

    archive = write_archive(root / "cifar" / "cifar-10-python.tar.gz", per_batch=100 if quick else 250)
    return {"digits_mlp": {"name": "digits"}, "cifar_cnn": {"name": "cifar10", "path": str(archive.parent),
                                                            "download": False}}


def bench_loops(data: dict[str, dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    rows = []
    for framework, model in itertools.product(("torch", "lightning"), ("digits_mlp", "cifar_cnn")):
        epochs = 3 if quick else EPOCHS[model]
        label, idiomatic = IDIOMATIC[framework]
        repeats = 1 if quick else REPEATS[model]
        runs: dict[str, list[dict[str, Any]]] = {"mlk": [], "idiomatic": []}
        before = loadavg()
        for repeat in range(repeats):  # the sides swap places every repeat
            mlk_run, own_run = in_lockstep(framework, model, data[model], epochs, idiomatic, repeat % 2 == 0)
            runs["mlk"].append(mlk_run)
            runs["idiomatic"].append(own_run)
        row = {"framework": framework, "model": model, "dataset": data[model]["name"], "idiomatic": label,
               "epochs": epochs, "repeats": repeats, "batch_size": BATCH, "threads": THREADS,
               **compare(runs["mlk"], runs["idiomatic"]), "loadavg_before": before, "loadavg_after": loadavg(),
               "runs": runs}
        rows.append(row)
        print(f"{framework:9s} {model:10s} {summary(row)}", flush=True)
    return rows


def in_lockstep(framework: str, model: str, data: dict[str, Any], epochs: int,
                own: Callable[..., dict[str, Any]], mlk_first: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """One repeat: mlk's trial and the own loop ``own`` taking turns epoch by epoch, the first side on
    the main thread (:func:`benchmarks.frameworks.lockstep.run_pair`)."""
    from benchmarks.frameworks.lockstep import run_pair

    mlk_run, own_run = run_pair(lambda turn: through_mlk(framework, model, data, epochs, turn=turn),
                                lambda stamp: own(model, data, epochs, stamp=stamp), mlk_first)
    mlk_run["mlk_first"] = own_run["mlk_first"] = mlk_first
    mlk_run["checkpoint_s"] = mlk_run["tail_s"]  # after its last report: the request's final checkpoint
    return mlk_run, own_run


def compare(mlk_runs: list[dict[str, Any]], own_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats of both sides' epoch times and their ratio (mlk / own), and the median
    over every epoch pair of mlk's epoch / the own loop's epoch after it (``paired_ratio``, which
    cancels the machine's drift). The goal is judged on the paired ratio."""
    from benchmarks.frameworks.lockstep import paired_ratio

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    mlk_s, own_s = med(mlk_runs, "epoch_s"), med(own_runs, "epoch_s")
    mlk_mean, own_mean = med(mlk_runs, "mean_epoch_s"), med(own_runs, "mean_epoch_s")
    paired = paired_ratio(list(zip(mlk_runs, own_runs, strict=True)))
    return {"mlk_epoch_s": mlk_s, "idiomatic_epoch_s": own_s, "ratio": mlk_s / own_s, "paired_ratio": paired,
            "goal": GOAL, "met": paired <= GOAL, "mlk_mean_epoch_s": mlk_mean, "idiomatic_mean_epoch_s": own_mean,
            "mean_ratio": mlk_mean / own_mean, "mlk_checkpoint_s": med(mlk_runs, "checkpoint_s")}


def summary(row: dict[str, Any]) -> str:
    return (f"mlk {row['mlk_epoch_s'] * 1000:8.1f} ms/epoch   {row['idiomatic']} {row['idiomatic_epoch_s'] * 1000:8.1f}"
            f" ms/epoch   ratio {row['ratio']:.3f} (paired {row['paired_ratio']:.3f})"
            f"   mean with the final checkpoint {row['mean_ratio']:.3f}"
            f" (checkpoint {row['mlk_checkpoint_s'] * 1000:.1f} ms)")


def bench_ddp(data: dict[str, dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    rows = []
    repeats = 1 if quick else DDP_REPEATS
    cases = [("torch", "digits_mlp"), ("torch", "cifar_cnn"), ("lightning", "cifar_cnn")]
    for framework, model in cases[:1] if quick else cases:
        epochs = 3 if quick else DDP_EPOCHS[model]
        n_train = len(load(data[model]).train[1])
        runs: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
        before = loadavg()
        for _ in range(repeats):
            for slots in (1, 2):
                runs[str(slots)].append(through_mlk(framework, model, data[model], epochs, slots, DDP_BATCH))
        one = statistics.median(r["epoch_s"] for r in runs["1"])
        two = statistics.median(r["epoch_s"] for r in runs["2"])
        rows.append({"framework": framework, "model": model, "epochs": epochs, "repeats": repeats,
                     "global_batch": DDP_BATCH, "threads_per_worker": THREADS, "train_examples": n_train,
                     "epoch_s_1": one, "epoch_s_2": two, "examples_per_s_1": n_train / one,
                     "examples_per_s_2": n_train / two, "speedup": one / two, "ideal": 2.0,
                     "efficiency": one / two / 2.0, "loadavg_before": before, "loadavg_after": loadavg(),
                     "runs": runs})
        print(f"DDP {framework:9s} {model:10s} 1 worker {n_train / one:8.1f} ex/s   2 workers {n_train / two:8.1f} "
              f"ex/s   speedup {one / two:.2f}x (ideal 2x)", flush=True)
    return rows


def table(result: dict[str, Any]) -> str:
    """The markdown tables of RESULTS.md."""
    lines = ["| framework | model | mlk s/epoch | idiomatic | idiomatic s/epoch | ratio of medians | paired ratio "
             "| goal <= 1.05 (paired) | mean ratio, with the final checkpoint |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["loops"]:
        lines.append(f"| {r['framework']} | {r['model']} | {r['mlk_epoch_s']:.3f} | {r['idiomatic']} | "
                     f"{r['idiomatic_epoch_s']:.3f} | {r['ratio']:.3f} | {r['paired_ratio']:.3f} | "
                     f"{'yes' if r['met'] else 'no'} | {r['mean_ratio']:.3f} |")
    lines += ["", "| DDP | model | 1 worker ex/s | 2 workers ex/s | speedup | ideal |", "|---|---|---|---|---|---|"]
    for r in result["ddp"]:
        lines.append(f"| {r['framework']} | {r['model']} | {r['examples_per_s_1']:.0f} | {r['examples_per_s_2']:.0f} "
                     f"| {r['speedup']:.2f}x | 2x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, three epochs, a smaller image set")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    parser.add_argument("--no-keras-jax", action="store_true", help="skip benchmarks.frameworks.keras_jax")
    parser.add_argument("--no-ddp", action="store_true", help="skip the data-parallel throughput")
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mlk-bench-data-") as tmp:
        data = datasets(Path(tmp), args.quick)
        loops = bench_loops(data, args.quick)
        ddp = [] if args.no_ddp else bench_ddp(data, args.quick)
    result = {
        "command": " ".join(["python -m benchmarks.frameworks.run", *(argv if argv is not None else sys.argv[1:])]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "seconds": time.time() - started,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": _versions(),
        "loops": loops,
        "ddp": ddp,
    }
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(table(result))
    if not args.no_keras_jax and importlib.util.find_spec("benchmarks.frameworks.keras_jax") is not None:
        from benchmarks.frameworks import keras_jax

        return int(keras_jax.main(["--quick"] if args.quick else []))
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("torch", "pytorch-lightning"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


if __name__ == "__main__":
    sys.exit(main())
