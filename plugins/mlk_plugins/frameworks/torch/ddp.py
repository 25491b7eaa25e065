"""Data parallelism for the torch and lightning frameworks, from the kernel's ``ctx.distributed``.

Each rank trains on its shard of the *same global batch* the single-process loop would use: the
global batch is drawn (and augmented) exactly as with one process, split into ``world_size``
nearly equal slices (:func:`shard`), and rank ``r`` takes slice ``r``. Gradients are combined by
:func:`weighted_allreduce_hook`, a DDP communication hook that weights each rank's mean gradient
by its share of the global batch, so a step equals the single-process step on the whole batch
(up to floating-point summation order) even when the last batch does not split evenly.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from mlk.distributed import Distributed

#: How long a collective waits for a peer. A dead peer is caught sooner by the kernel's supervisor,
#: which kills every rank; this only bounds a peer that hangs while alive.
TIMEOUT = datetime.timedelta(minutes=30)


def init(place: Distributed, backend: str | None = None) -> None:
    """Join the trial's process group (once per process), over ``backend`` (default: the kernel's
    choice, ``place.backend``)."""
    if dist.is_initialized():
        return
    dist.init_process_group(backend or place.backend, init_method=place.init_method, rank=place.rank,
                            world_size=place.world_size, timeout=TIMEOUT)


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of a global batch: ``world_size`` contiguous slices whose sizes differ
    by at most one (the first ones are larger)."""
    return batch.tensor_split(world_size)[rank]


def shard_sizes(n: int, world_size: int) -> list[int]:
    """The sizes :func:`shard` gives each rank for a global batch of ``n``."""
    return [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]


@dataclass
class ShardWeight:
    """The state of :func:`weighted_allreduce_hook`: this rank's share of the current global batch."""

    local: int = 1
    total: int = 1

    def set(self, local: int, total: int) -> None:
        self.local, self.total = local, max(1, total)


def weighted_allreduce_hook(state: ShardWeight, bucket: Any) -> Any:
    """DDP communication hook: sum over ranks of ``grad * local / total``.

    Each rank's gradient is of its mean loss over ``local`` examples, so the sum is the gradient of
    the mean loss over all ``total`` examples of the global batch, as one process would compute it.
    """
    buffer = bucket.buffer()
    buffer.mul_(state.local / state.total)
    future = dist.all_reduce(buffer, async_op=True).get_future()
    return future.then(lambda f: f.value()[0])


def wrap(model: torch.nn.Module, weight: ShardWeight) -> torch.nn.Module:
    """``model`` in DistributedDataParallel with :func:`weighted_allreduce_hook`; the initial weights of
    rank 0 are broadcast to every rank."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    register_hook(ddp, weight)
    return ddp


def register_hook(model: Any, weight: ShardWeight) -> None:
    """Install :func:`weighted_allreduce_hook` on a DistributedDataParallel ``model`` (before its first
    backward pass)."""
    # A lambda: DDP rejects a hook whose annotations are strings (postponed evaluation here).
    model.register_comm_hook(weight, lambda state, bucket: weighted_allreduce_hook(state, bucket))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def sum_over_ranks(values: list[float], device: torch.device | str | None = None) -> list[float]:
    """Elementwise sum of ``values`` over every rank (float64, on ``device``: a GPU under NCCL)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t]


def any_rank_each(flags: list[bool]) -> list[bool]:
    """Each of ``flags`` true on every rank when true on any (one collective for all of them):
    ranks decide together to stop or to save."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def parameter_digest(model: torch.nn.Module) -> str:
    """A sha256 of every parameter's bytes, to compare replicas."""
    import hashlib

    h = hashlib.sha256()
    for name, p in unwrap(model).named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def leave() -> None:
    """Leave the process group (end of a rank's trial)."""
    if dist.is_initialized():
        dist.destroy_process_group()
