"""JAX multi-process data parallelism for ``resources.slots_per_trial: N`` (``ctx.distributed``).

Each rank process joins ``jax.distributed`` (the coordinator at ``ctx.distributed.addr:port``;
gloo collectives between CPU processes) and the N devices form a one-axis mesh ``data``.
Parameters and optimiser state are replicated over it; every global batch is split into N equal
shards, rank r feeding shard r. The jitted step then computes the loss over the whole global batch
and XLA all-reduces the gradients, so N ranks train what one process would on the same global
batch (dropout and augmentation draws are the same too: JAX's partitionable threefry gives a
sharded array the bits of the unsharded one); only the order of floating-point sums differs.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlk.errors import MlkError


class DataParallel:
    """This rank's place in a data-parallel JAX trial and the arrays it shares with the others."""

    def __init__(self, place: Any) -> None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"{place.addr}:{place.port}",
                                   num_processes=place.world_size, process_id=place.rank)
        self.rank, self.size = int(place.rank), int(place.world_size)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.sharded = NamedSharding(mesh, PartitionSpec("data"))

    def replicate(self, tree: Any) -> Any:
        """``tree`` (the same values on every rank) as arrays replicated over the mesh."""
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_process_local_data(self.replicated, np.asarray(a)), tree)

    def shard(self, batch: np.ndarray) -> Any:
        """A global batch (the same on every rank) as an array split over the mesh; this rank gives its part."""
        return jax.make_array_from_process_local_data(self.sharded, np.split(batch, self.size)[self.rank])

    @staticmethod
    def local(tree: Any) -> Any:
        """This rank's copy of replicated arrays, as ordinary single-device arrays."""
        return jax.tree_util.tree_map(lambda a: a.addressable_data(0), tree)

    def check_identical(self, tree: Any, what: str) -> None:
        """Fail when the replicas of ``tree`` differ between ranks (a digest per leaf, all-gathered)."""
        digest = np.array([float(np.sum(np.square(np.asarray(leaf, np.float64))))
                           for leaf in jax.tree_util.tree_leaves(self.local(tree))])
        gathered = np.asarray(multihost_utils.process_allgather(digest))
        if not (gathered == gathered[0]).all():
            raise MlkError(f"the {what} of the {self.size} ranks differ: data-parallel replicas diverged")

    def any_rank_each(self, flags: list[bool]) -> list[bool]:
        """Each of ``flags`` true on every rank when true on any: ranks decide together to stop or
        to save, so none is left alone in a collective."""
        gathered = np.asarray(multihost_utils.process_allgather(np.array(flags, dtype=np.int32)))
        return [bool(v) for v in gathered.reshape(self.size, len(flags)).any(axis=0)]

    def shutdown(self) -> None:
        jax.distributed.shutdown()
