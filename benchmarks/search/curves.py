"""Record the digits learning-curve table: N random MLP configurations, each trained 81 epochs.

    python -m benchmarks.search.curves                 # the committed table (N=2000, seed 0)
    python -m benchmarks.search.curves --n 40 --epochs 5 --out /tmp/t.npz   # a quick try

Each configuration is drawn (seeded) from the ``hyperparameters:`` of ``specs/digits_base.yaml``,
exactly as mlk's searchers draw them, and trained for real on the digits split of the ``digits``
dataset plugin (``DigitsDataset``, 60/20/20, fixed permutation): the ``digits_mlp`` network
(Linear(64, hidden) - ReLU - Dropout - Linear(hidden, 10)), cross entropy, Adam with torch's
defaults (betas 0.9/0.999, eps 1e-8, no weight decay) at the configuration's learning rate, the
training split shuffled every epoch and cut into batches of the configuration's batch size (the
last batch smaller), dropout in training only. After every epoch the validation split is scored
in eval mode: ``val_loss`` (mean cross entropy) and ``val_accuracy``, as the torch framework
reports them.

To make 1000 x 81 epochs affordable on 2 cores, many models train at once as one batched
computation. Configurations with the same batch size are sorted by width and cut into chunks; a
chunk of K models stores its weights as stacked tensors (K, 64, H), (K, H, 10)... with H the
widest model of the chunk. Hidden units past a model's own width are masked to zero, so their
weights get zero gradients, Adam never moves them, and each model computes exactly what an MLP
of its own width computes. Forward and backward passes are written out (``torch.bmm``) and Adam
runs over all parameters of the chunk at once with a per-model learning rate. Each model has its
own initial weights (torch's ``nn.Linear`` initialisation, drawn from a per-model seed) and its
own shuffle order every epoch; dropout masks are drawn per chunk. So the table is a deterministic
function of ``--seed``, ``--n`` and ``--chunk`` (and, to float rounding, of the machine).
:func:`reference_check` compares the batched training against plain ``nn.Module`` +
``torch.optim.Adam`` training of the same models.

Output: ``data/digits_curves.npz`` (``val_loss``, ``val_accuracy``, ``train_loss`` as float32
arrays of shape (N, epochs); the hyperparameters as arrays) and ``data/digits_curves.json`` (the
configurations, the command, the seed, versions and timings).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.search.replay import BASE_SPEC, REPO, TABLE, digits_space

EPOCHS = 81
HP_NAMES = ("lr", "hidden", "dropout", "batch_size")

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def say(message: str) -> None:
    print(f"[curves] {message}", file=sys.stderr, flush=True)


# -- configurations and data ----------------------------------------------------------------------


def sample_configs(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` configurations drawn from the digits space with ``random.Random(seed)``, as a searcher does."""
    space = digits_space()
    rng = random.Random(seed)
    return [space.sample(rng) for _ in range(n)]


def digits_tensors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The train and val splits of the ``digits`` dataset plugin, as float32 / int64 tensors."""
    from mlk_plugins.datasets.digits import DigitsConfig, DigitsDataset

    splits = DigitsDataset(DigitsConfig(name="digits")).load()
    return {name: (torch.as_tensor(np.asarray(x), dtype=torch.float32), torch.as_tensor(np.asarray(y)))
            for name, (x, y) in (("train", splits.train), ("val", splits.val))}


def model_seed(seed: int, index: int) -> int:
    from mlk.trial import derive_seed

    return derive_seed(seed, "digits-curve", index)


# -- batched training -------------------------------------------------------------------------------


class Chunk:
    """K MLPs of one batch size trained together; see the module docstring."""

    def __init__(self, configs: list[dict[str, Any]], seeds: list[int], n_in: int, n_out: int) -> None:
        self.k = k = len(configs)
        self.n_in, self.n_out = n_in, n_out
        widths = [int(c["hidden"]) for c in configs]
        self.h = h = max(widths)
        sizes = [k * n_in * h, k * h, k * h * n_out, k * n_out]
        self.theta = torch.zeros(sum(sizes))
        self.grad = torch.zeros_like(self.theta)
        self.m = torch.zeros_like(self.theta)
        self.v = torch.zeros_like(self.theta)
        self.w1, self.b1, self.w2, self.b2 = self._views(self.theta, sizes)
        self.gw1, self.gb1, self.gw2, self.gb2 = self._views(self.grad, sizes)
        self.mask = torch.zeros(k, 1, h)
        lr = torch.tensor([float(c["lr"]) for c in configs])
        self.lr_flat = torch.cat([lr.repeat_interleave(s // k) for s in sizes])
        self.keep = torch.tensor([1.0 - float(c["dropout"]) for c in configs]).view(k, 1, 1)
        self.dropout = any(float(c["dropout"]) > 0 for c in configs)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.step_count = 0
        for i, width in enumerate(widths):  # torch's nn.Linear initialisation, per model
            g = self.generators[i]
            b_in, b_hid = 1.0 / math.sqrt(n_in), 1.0 / math.sqrt(width)
            # nn.Linear stores (out, in); draw in that shape so the numbers match a real module's
            self.w1[i, :, :width] = (torch.rand(width, n_in, generator=g) * 2 - 1).mul_(b_in).t()
            self.b1[i, 0, :width] = (torch.rand(width, generator=g) * 2 - 1) * b_in
            self.w2[i, :width, :] = (torch.rand(n_out, width, generator=g) * 2 - 1).mul_(b_hid).t()
            self.b2[i, 0, :] = (torch.rand(n_out, generator=g) * 2 - 1) * b_hid
            self.mask[i, 0, :width] = 1.0

    def _views(self, flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        k, h = self.k, self.h
        shapes = [(k, self.n_in, h), (k, 1, h), (k, h, self.n_out), (k, 1, self.n_out)]
        out, start = [], 0
        for size, shape in zip(sizes, shapes):
            out.append(flat[start:start + size].view(shape))
            start += size
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (K, B, out) and hidden pre-activations of a batch ``x`` (K, B, in) or (B, in), no dropout."""
        if x.dim() == 2:
            x = x.expand(self.k, *x.shape)
        z = torch.baddbmm(self.b1, x, self.w1)
        a = torch.relu(z) * self.mask
        return torch.baddbmm(self.b2, a, self.w2), z

    def train_step(self, x: torch.Tensor, y: torch.Tensor, drop_gen: torch.Generator) -> torch.Tensor:
        """One Adam step of every model on its own batch ``x`` (K, B, in), ``y`` (K, B); returns the losses (K,)."""
        k, b = y.shape
        z = torch.baddbmm(self.b1, x, self.w1)
        gate = (z > 0).to(z.dtype) * self.mask
        if self.dropout:
            gate = gate * ((torch.rand(z.shape, generator=drop_gen) < self.keep).to(z.dtype) / self.keep)
        a = z * gate  # relu, mask and dropout in one product
        logits = torch.baddbmm(self.b2, a, self.w2)
        logp = torch.log_softmax(logits, dim=2)
        losses = -logp.gather(2, y.unsqueeze(2)).squeeze(2).mean(1)
        # d(mean cross entropy)/d logits = (softmax - onehot) / B, per model
        dlogits = logp.exp_()
        dlogits.scatter_add_(2, y.unsqueeze(2), torch.full((k, b, 1), -1.0))
        dlogits.div_(b)
        torch.bmm(a.transpose(1, 2), dlogits, out=self.gw2)
        torch.sum(dlogits, dim=1, keepdim=True, out=self.gb2)
        dz = torch.bmm(dlogits, self.w2.transpose(1, 2)).mul_(gate)
        torch.bmm(x.transpose(1, 2), dz, out=self.gw1)
        torch.sum(dz, dim=1, keepdim=True, out=self.gb1)
        self._adam()
        return losses

    def _adam(self) -> None:
        """torch.optim.Adam's update (no amsgrad, no weight decay) with a learning rate per model."""
        self.step_count += 1
        t = self.step_count
        self.m.lerp_(self.grad, 1 - BETA1)
        self.v.mul_(BETA2).addcmul_(self.grad, self.grad, value=1 - BETA2)
        denom = self.v.sqrt().div_(math.sqrt(1 - BETA2**t)).add_(EPS)
        self.theta.addcdiv_(self.m * self.lr_flat, denom, value=-1.0 / (1 - BETA1**t))

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross entropy and accuracy (K,) of each model on ``x`` (N, in), ``y`` (N,), in eval mode."""
        logits, _ = self.forward(x)
        k, n, c = logits.shape
        loss = F.cross_entropy(logits.reshape(k * n, c), y.repeat(k), reduction="none").view(k, n).mean(1)
        acc = (logits.argmax(2) == y.unsqueeze(0)).to(torch.float32).mean(1)
        return loss, acc

    def epoch_batches(self, n_train: int, batch_size: int) -> list[torch.Tensor]:
        """This epoch's shuffle: each model its own permutation (from its generator), cut into batches."""
        order = torch.stack([torch.randperm(n_train, generator=g) for g in self.generators])
        return [order[:, s:s + batch_size] for s in range(0, n_train, batch_size)]


def train_chunk(configs: list[dict[str, Any]], seeds: list[int], data: dict[str, tuple[torch.Tensor, torch.Tensor]],
                epochs: int, drop_seed: int, on_epoch: Any = None) -> dict[str, np.ndarray]:
    """Train one chunk (all configs share a batch size) for ``epochs``; per-epoch curves (K, epochs)."""
    x_tr, y_tr = data["train"]
    x_va, y_va = data["val"]
    batch_size = int(configs[0]["batch_size"])
    assert all(int(c["batch_size"]) == batch_size for c in configs)
    chunk = Chunk(configs, seeds, x_tr.shape[1], int(y_tr.max()) + 1)
    drop_gen = torch.Generator().manual_seed(drop_seed)
    k = len(configs)
    out = {name: np.zeros((k, epochs), dtype=np.float32) for name in ("val_loss", "val_accuracy", "train_loss")}
    with torch.no_grad():
        for epoch in range(epochs):
            total = torch.zeros(k)
            for idx in chunk.epoch_batches(len(y_tr), batch_size):
                total += chunk.train_step(x_tr[idx], y_tr[idx], drop_gen) * idx.shape[1]
            loss, acc = chunk.evaluate(x_va, y_va)
            out["val_loss"][:, epoch] = loss.numpy()
            out["val_accuracy"][:, epoch] = acc.numpy()
            out["train_loss"][:, epoch] = (total / len(y_tr)).numpy()
            if on_epoch is not None:
                on_epoch(epoch + 1)
    return out


def plan_chunks(configs: list[dict[str, Any]], chunk: int) -> list[list[int]]:
    """Indices of configs grouped by batch size, sorted by width, cut into chunks of at most ``chunk``."""
    plans = []
    for bs in sorted({int(c["batch_size"]) for c in configs}):
        idx = sorted((i for i, c in enumerate(configs) if int(c["batch_size"]) == bs),
                     key=lambda i: (int(configs[i]["hidden"]), i))
        plans += [idx[s:s + chunk] for s in range(0, len(idx), chunk)]
    return plans


_DATA: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _chunk_task(args: tuple[list[dict[str, Any]], list[int], int, int, int]) -> dict[str, Any]:
    """One chunk in a worker process (``--processes`` > 1): the same computation as in-process."""
    configs, seeds, epochs, drop_seed, threads = args
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    if not _DATA:
        _DATA.update(digits_tensors())
    t0 = time.perf_counter()
    out = train_chunk(configs, seeds, _DATA, epochs, drop_seed=drop_seed)
    return {"curves": out, "seconds": time.perf_counter() - t0}


def generate(n: int, epochs: int, seed: int, chunk: int, threads: int, processes: int = 1) -> dict[str, Any]:
    """Train every chunk; with ``processes`` > 1, chunks run in that many worker processes (same numbers:
    a chunk's result depends only on its configurations and seeds)."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # Adam's second moments decay into denormals, which are very slow on CPU
    configs = sample_configs(n, seed)
    data = digits_tensors()
    n_train = len(data["train"][1])
    plans = plan_chunks(configs, chunk)
    # cost of a chunk-epoch ~ steps x widest model x models, for the ETA
    costs = [math.ceil(n_train / int(configs[p[0]]["batch_size"])) * (1 + max(int(configs[i]["hidden"]) for i in p)
                                                                        / 64) * len(p) for p in plans]
    total_cost = sum(costs) * epochs
    curves = {name: np.zeros((n, epochs), dtype=np.float32) for name in ("val_loss", "val_accuracy", "train_loss")}
    started = time.perf_counter()
    done_cost = 0.0
    last_say = 0.0
    timings = []

    def label(ci: int) -> str:
        plan = plans[ci]
        return (f"chunk {ci + 1}/{len(plans)} (batch {configs[plan[0]]['batch_size']}, {len(plan)} models, "
                f"width <= {max(int(configs[i]['hidden']) for i in plan)})")

    def report(text: str, frac: float) -> None:
        elapsed = time.perf_counter() - started
        eta = elapsed / frac * (1 - frac) if frac > 0 else float("nan")
        say(f"{text}; {100 * frac:.1f}% done, {elapsed:.0f}s elapsed, ETA {eta:.0f}s")

    def store(ci: int, out: dict[str, np.ndarray], seconds: float) -> None:
        nonlocal done_cost
        plan = plans[ci]
        for name, arr in out.items():
            curves[name][plan] = arr
        done_cost += costs[ci] * epochs
        timings.append({"chunk": ci, "models": len(plan), "batch_size": int(configs[plan[0]]["batch_size"]),
                        "width": max(int(configs[i]["hidden"]) for i in plan), "seconds": seconds})

    tasks = [([configs[i] for i in plan], [model_seed(seed, i) for i in plan], epochs, model_seed(seed, -1 - ci),
              threads) for ci, plan in enumerate(plans)]
    if processes > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn")) as pool:
            for ci, res in enumerate(pool.map(_chunk_task, tasks)):
                store(ci, res["curves"], res["seconds"])
                report(f"{label(ci)} done", done_cost / total_cost)
    else:
        for ci, (cfgs, seeds, _, drop_seed, _) in enumerate(tasks):
            t0 = time.perf_counter()

            def progress(epoch: int, text: str = label(ci), base: float = done_cost, cost: float = costs[ci]) -> None:
                nonlocal last_say
                now = time.perf_counter()
                if now - last_say < 15 and epoch != epochs:
                    return
                last_say = now
                report(f"{text} epoch {epoch}/{epochs}", (base + cost * epoch) / total_cost)

            out = train_chunk(cfgs, seeds, data, epochs, drop_seed=drop_seed, on_epoch=progress)
            store(ci, out, time.perf_counter() - t0)
    return {"configs": configs, "curves": curves, "seconds": time.perf_counter() - started, "chunks": timings}


def save(result: dict[str, Any], out: Path, argv: list[str], seed: int, chunk: int, threads: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    configs = result["configs"]
    arrays = {name: arr.astype(np.float32) for name, arr in result["curves"].items()}
    arrays["lr"] = np.array([c["lr"] for c in configs], dtype=np.float64)
    arrays["hidden"] = np.array([c["hidden"] for c in configs], dtype=np.int32)
    arrays["dropout"] = np.array([c["dropout"] for c in configs], dtype=np.float64)
    arrays["batch_size"] = np.array([c["batch_size"] for c in configs], dtype=np.int32)
    np.savez_compressed(out, **arrays)
    meta = {
        "command": "python -m benchmarks.search.curves" + ("" if not argv else " " + " ".join(argv)),
        "seed": seed, "chunk": chunk, "threads": threads, "n": len(configs),
        "epochs": int(arrays["val_loss"].shape[1]),
        "space": str(BASE_SPEC.relative_to(REPO)),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "seconds": round(result["seconds"], 1),
        "chunks": result["chunks"],
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "metrics": {"val_loss": "mean cross entropy on the val split after each epoch (eval mode)",
                    "val_accuracy": "accuracy on the val split after each epoch",
                    "train_loss": "mean training loss over each epoch's batches"},
        "configs": configs,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")


# -- checking the batched training against plain torch ----------------------------------------------


def reference_check(n: int = 3, epochs: int = 2, seed: int = 7) -> float:
    """Largest absolute difference of ``val_loss`` between the batched training and ``nn.Module`` +
    ``torch.optim.Adam`` training of the same models (same initial weights and batch order, no dropout)."""
    from mlk_plugins.models._torch_nets import MLP

    configs = [dict(c, dropout=0.0, batch_size=32) for c in sample_configs(n, seed)]
    seeds = [model_seed(seed, i) for i in range(n)]
    data = digits_tensors()
    x_tr, y_tr = data["train"]
    x_va, y_va = data["val"]
    batched = train_chunk(configs, seeds, data, epochs, drop_seed=0)["val_loss"]
    worst = 0.0
    for i, cfg in enumerate(configs):
        g = torch.Generator().manual_seed(seeds[i])
        model = MLP(x_tr.shape[1], int(cfg["hidden"]), 10, 0.0)
        b_in, b_hid = 1.0 / math.sqrt(x_tr.shape[1]), 1.0 / math.sqrt(int(cfg["hidden"]))
        with torch.no_grad():  # the same draws, in the same order, as Chunk.__init__
            model.fc1.weight.copy_((torch.rand(model.fc1.weight.shape, generator=g) * 2 - 1) * b_in)
            model.fc1.bias.copy_((torch.rand(model.fc1.bias.shape, generator=g) * 2 - 1) * b_in)
            model.fc2.weight.copy_((torch.rand(model.fc2.weight.shape, generator=g) * 2 - 1) * b_hid)
            model.fc2.bias.copy_((torch.rand(model.fc2.bias.shape, generator=g) * 2 - 1) * b_hid)
        opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]))
        for epoch in range(epochs):
            order = torch.randperm(len(y_tr), generator=g)
            model.train()
            for s in range(0, len(y_tr), 32):
                idx = order[s:s + 32]
                opt.zero_grad()
                F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                loss = float(F.cross_entropy(model(x_va), y_va))
            worst = max(worst, abs(loss - float(batched[i, epoch])))
    return worst


def verify(path: Path, chunks: int, threads: int) -> int:
    """Retrain the first ``chunks`` chunks of the table at ``path`` with its recorded seed and chunk size,
    and compare every curve bit for bit."""
    meta = json.loads(path.with_suffix(".json").read_text())
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    configs = sample_configs(meta["n"], meta["seed"])
    if configs != meta["configs"]:
        say("the configurations differ from the table's")
        return 1
    with np.load(path) as z:
        table = {k: z[k] for k in ("val_loss", "val_accuracy", "train_loss")}
    data = digits_tensors()
    same = True
    for ci, plan in enumerate(plan_chunks(configs, meta["chunk"])[:chunks]):
        t0 = time.perf_counter()
        out = train_chunk([configs[i] for i in plan], [model_seed(meta["seed"], i) for i in plan], data,
                          meta["epochs"], drop_seed=model_seed(meta["seed"], -1 - ci))
        equal = all(np.array_equal(out[k], table[k][plan]) for k in out)
        worst = max(float(np.abs(out[k] - table[k][plan]).max()) for k in out)
        say(f"chunk {ci + 1}: {len(plan)} models, {'identical' if equal else f'max difference {worst:.3g}'} "
            f"({time.perf_counter() - t0:.0f}s)")
        same = same and equal
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.search.curves", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="configurations (default 2000)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help=f"epochs per configuration (default {EPOCHS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the configurations and the training (default 0)")
    p.add_argument("--chunk", type=int, default=64, help="models trained together (default 64)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine more threads mostly wait)")
    p.add_argument("--processes", type=int, default=1,
                   help="worker processes, each training whole chunks (default 1; the table is the same)")
    p.add_argument("--out", type=Path, default=TABLE, help=f"the .npz to write (default {TABLE})")
    p.add_argument("--check", action="store_true", help="only compare batched training with plain torch")
    p.add_argument("--verify", type=int, metavar="K", default=0,
                   help="retrain the first K chunks and compare them with the table at --out (bit for bit)")
    args = p.parse_args(argv)
    if args.check:
        say(f"largest |val_loss difference| batched vs nn.Module + Adam: {reference_check():.2e}")
        return 0
    if args.verify:
        return verify(args.out, args.verify, args.threads)
    say(f"{args.n} configurations x {args.epochs} epochs, seed {args.seed}, chunks of {args.chunk}, "
        f"{args.threads} threads")
    result = generate(args.n, args.epochs, args.seed, args.chunk, args.threads, args.processes)
    save(result, args.out, argv, args.seed, args.chunk, args.threads)
    say(f"done in {result['seconds']:.0f}s; wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) and "
        f"{args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
