"""TensorFlow multi-worker data parallelism for ``resources.slots_per_trial: N`` (``ctx.distributed``).

Each rank process is one worker of a ``tf.distribute.MultiWorkerMirroredStrategy`` whose cluster
(``TF_CONFIG``) lists every rank at ``ctx.distributed.addr`` on its ``worker_ports`` entry; the
collectives are TensorFlow's ring all-reduce over gRPC, which runs on CPU. Variables created in
:meth:`DataParallel.scope` are mirrored: every rank holds a replica, initialised identically.

Every rank draws the *same global batch* one process would (same shuffle, same augmentation) and
trains on its contiguous shard of it (:func:`shard_bounds`: sizes differ by at most one, the first
ones larger). Each rank's loss is its shard's summed loss divided by the size of the *global*
batch, and Keras's optimiser sums the gradients over ranks, so a step is the single-process step
on the whole batch up to floating-point summation order, even when a batch does not split evenly.
State a rank updates from its own shard alone (BatchNormalization's moving statistics) is replaced
by rank 0's after each epoch, and each epoch checks that the trained weights agree on every rank.

Keras 3's ``fit`` cannot drive this strategy (it reduces the first input batch and each step's
metrics along axis 0 across workers, which fails: keras-team/keras#20585), so the ranks run the
small epoch loop of :meth:`DataParallel.train_epoch` and :meth:`DataParallel.evaluate` instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from mlk_plugins._tensorflow import import_tensorflow

tf = import_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402

from mlk.errors import MlkError  # noqa: E402

if TYPE_CHECKING:
    from mlk.distributed import Distributed


def tf_config(place: Distributed) -> dict[str, Any]:
    """The ``TF_CONFIG`` of rank ``place.rank``: every rank a worker at ``addr:worker_ports[rank]``."""
    if len(place.worker_ports) != place.world_size:
        raise MlkError(f"the keras framework needs one worker port per rank; got {len(place.worker_ports)} "
                       f"for {place.world_size} ranks")
    workers = [f"{place.addr}:{port}" for port in place.worker_ports]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": place.rank}}


def shard_bounds(n: tf.Tensor, rank: int, world_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """``[start, stop)`` of rank ``rank``'s slice of a batch of ``n`` (an int32 scalar): ``world_size``
    contiguous slices whose sizes differ by at most one, the first ones larger (as the torch
    framework's ``tensor_split``)."""
    base, extra = n // world_size, n % world_size
    start = rank * base + tf.minimum(rank, extra)
    return start, start + base + tf.cast(rank < extra, n.dtype)


class DataParallel:
    """This rank's worker in a ``MultiWorkerMirroredStrategy`` and the collectives the loop needs.

    Create it before TensorFlow runs any op in this process: the strategy configures the runtime's
    collectives, which it can do only at start-up.
    """

    def __init__(self, place: Distributed) -> None:
        os.environ["TF_CONFIG"] = json.dumps(tf_config(place))
        ring = tf.distribute.experimental.CommunicationImplementation.RING
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(implementation=ring))
        self.rank, self.size = int(place.rank), int(place.world_size)
        if self.strategy.num_replicas_in_sync != self.size:
            raise MlkError(f"TensorFlow formed {self.strategy.num_replicas_in_sync} replicas for {self.size} ranks")
        self._steps: tuple[Any, Any] | None = None

    def scope(self) -> AbstractContextManager[Any]:
        """Variables created inside are mirrored over the ranks (model, optimiser, metrics)."""
        return self.strategy.scope()

    def shard(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """This rank's slice of a global batch ``(x, y)``, and the global batch's size (float32)."""
        n = tf.shape(y)[0]
        start, stop = shard_bounds(n, self.rank, self.size)
        return x[start:stop], y[start:stop], tf.cast(n, tf.float32)

    # -- collectives on plain values -----------------------------------------------------------

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Elementwise sum of ``values`` over every rank (float64)."""
        local = tf.constant(values, tf.float64)
        total = self.strategy.reduce(tf.distribute.ReduceOp.SUM, self.strategy.run(lambda: tf.identity(local)),
                                     axis=None)
        return [float(v) for v in total.numpy()]

    def any_rank_each(self, flags: list[bool]) -> list[bool]:
        """Each of ``flags`` true on every rank when true on any (one collective for all of them):
        ranks decide together to stop or to save."""
        return [v > 0 for v in self.sum_over_ranks([1.0 if f else 0.0 for f in flags])]

    def share_first(self, variables: list[Any]) -> None:
        """Give every rank rank 0's values of ``variables`` (as torch's DDP does with its buffers).

        For the state each rank updates from its own shard, such as BatchNormalization's moving
        statistics, so the replicas, the checkpoint and the evaluation all use rank 0's.
        """
        floats = [v for v in variables if np.issubdtype(np.dtype(v.dtype), np.floating)]
        if not floats:
            return
        local = [np.asarray(v.numpy(), np.float64).ravel() for v in floats]
        flat = np.concatenate(local) if self.rank == 0 else np.zeros(sum(a.size for a in local))
        shared = np.asarray(self.sum_over_ranks(flat.tolist()))
        start = 0
        for v, a in zip(floats, local):
            v.assign(shared[start:start + a.size].reshape(tuple(v.shape)).astype(np.dtype(v.dtype)))
            start += a.size

    def check_identical(self, variables: list[Any], what: str) -> None:
        """Fail when the replicas of ``variables`` differ between ranks (a digest per variable, all-gathered)."""
        digest = tf.constant([[float(np.sum(np.square(np.asarray(v.numpy(), np.float64)))) for v in variables]],
                             tf.float64)
        gathered = self.strategy.gather(self.strategy.run(lambda: tf.identity(digest)), axis=0).numpy()
        if not (gathered == gathered[0]).all():
            raise MlkError(f"the {what} of the {self.size} ranks differ: data-parallel replicas diverged")

    # -- the epoch loop ---------------------------------------------------------------------------

    def steps(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> tuple[Any, Any]:
        """The (train, evaluate) step functions, traced once per trial."""
        if self._steps is None:
            per_example = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
            strategy, size = self.strategy, self.size

            def regularisation() -> tf.Tensor:
                # What Keras adds to a batch's mean loss: the model's own losses (weight regularisers).
                return tf.add_n([tf.cast(v, tf.float32) for v in model.losses]) if model.losses else tf.constant(0.0)

            def train_replica(x: tf.Tensor, y: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
                with tf.GradientTape() as tape:
                    losses = per_example(y, model(x, training=True))
                    extra = regularisation()
                    # Summed over ranks (the optimiser all-reduces gradients): the global batch's mean loss.
                    loss = tf.reduce_sum(losses) / n + extra / size
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
                # What Keras's loss tracker adds for this shard: its examples times the batch's loss.
                return tf.reduce_sum(losses) + extra * tf.cast(tf.shape(y)[0], tf.float32)

            def eval_replica(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
                logits = model(x, training=False)
                count = tf.cast(tf.shape(y)[0], tf.float32)
                correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1), tf.cast(y, tf.int64)), tf.float32))
                return tf.stack([tf.reduce_sum(per_example(y, logits)) + regularisation() * count, correct, count])

            @tf.function
            def train(x: tf.Tensor, y: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
                return strategy.experimental_local_results(strategy.run(train_replica, args=(x, y, n)))[0]

            @tf.function
            def evaluate(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
                return strategy.experimental_local_results(strategy.run(eval_replica, args=(x, y)))[0]

            self._steps = (train, evaluate)
        return self._steps

    def train_epoch(self, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                    batches: Iterator[tuple[tf.Tensor, tf.Tensor, tf.Tensor]], steps: int) -> float:
        """``steps`` optimisation steps on this rank's shards from ``batches``; the mean training loss
        over every rank's examples (as Keras's ``loss`` log)."""
        train, _ = self.steps(model, optimizer)
        total, count = 0.0, 0.0
        for _ in range(steps):
            x, y, n = next(batches)
            total += float(train(x, y, n))  # every rank steps, even on an empty shard
            count += int(tf.shape(y)[0])
        total, count = self.sum_over_ranks([total, count])
        return total / count if count else float("nan")

    def evaluate(self, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                 dataset: tf.data.Dataset) -> dict[str, float]:
        """Mean ``loss`` and ``accuracy`` over ``dataset``'s batches, each rank evaluating its shard of each."""
        _, evaluate = self.steps(model, optimizer)
        sums = np.zeros(3)
        for x, y in dataset:
            x, y, _ = self.shard(x, y)
            sums += evaluate(x, y).numpy()
        loss, correct, count = self.sum_over_ranks(sums.tolist())
        if not count:
            return {"loss": float("nan"), "accuracy": float("nan")}
        return {"loss": loss / count, "accuracy": correct / count}
