"""The Keras training loop (:class:`KerasTrial`), its ``tf.data`` input and its checkpoint format.

A checkpoint folder holds:

- ``model.npz``: every model variable (``model.weights``, in order) under ``v000``, ``v001``...;
- ``optimizer.npz``: the optimiser's variables (iteration count, moments) except the learning
  rate, which always comes from the trial's own ``framework.lr``;
- ``keras.json``: the variables' paths and shapes (checked on load), the trial and its epoch.

``np.load(..., allow_pickle=False)`` reads them, so loading a checkpoint never runs code.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlk_plugins._tensorflow import import_tensorflow

tf = import_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402
from tensorflow.python.framework import config as tf_config  # noqa: E402

from mlk.errors import UserError  # noqa: E402
from mlk.trial import derive_seed  # noqa: E402

if TYPE_CHECKING:
    from mlk.datasets import DataSplits
    from mlk.trial import TrialContext
    from mlk_plugins.frameworks.keras import KerasConfig
    from mlk_plugins.frameworks.keras._distributed import DataParallel

MODEL_FILE = "model.npz"
OPTIMIZER_FILE = "optimizer.npz"
INFO_FILE = "keras.json"


def set_determinism(deterministic: bool, threads: int | None = None) -> dict[str, object]:
    """Switch TensorFlow's op determinism (and its thread pools, while they can still change);
    return the flags, for provenance."""
    if threads is not None:
        try:  # only before TensorFlow's runtime starts; a worker's later trials keep the first setting
            tf.config.threading.set_intra_op_parallelism_threads(max(1, int(threads)))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()
    return {
        "tf.config.experimental.enable_op_determinism": tf_config.is_op_determinism_enabled(),
        "tf.intra_op_parallelism_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf.inter_op_parallelism_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "keras.utils.set_random_seed": "trial seed before building, epoch seed each epoch",
        "keras.backend": keras.backend.backend(),
        "keras.version": keras.__version__,
        "tensorflow.version": tf.__version__,
    }


def build_keras_model(ctx: TrialContext) -> keras.Model:
    """The spec's ``model:`` built for keras, checked to be a ``keras.Model``."""
    model = ctx.build_model("keras")
    if not isinstance(model, keras.Model):
        raise UserError(f"the model built for keras is a {type(model).__name__}, not a keras.Model", where="model")
    return model


def augment_settings(ctx: TrialContext, meta: dict[str, Any]) -> dict[str, Any] | None:
    """``data.augment`` as shift fractions and a flip flag, or None when it asks for nothing."""
    raw = ctx.data.get("augment") or {}
    settings = {
        "width_shift": float(raw.get("width_shift", 0.0)),
        "height_shift": float(raw.get("height_shift", 0.0)),
        "horizontal_flip": bool(raw.get("horizontal_flip", False)),
    }
    if not any(settings.values()):
        return None
    if meta.get("layout") != "nchw":
        raise UserError(f"augmentation needs images (layout nchw); dataset '{ctx.data.get('name')}' gives "
                        f"layout {meta.get('layout')!r}", where="data.augment")
    return settings


def augment_images(images: tf.Tensor, seed: tf.Tensor, *, width_shift: float = 0.0, height_shift: float = 0.0,
                   horizontal_flip: bool = False) -> tf.Tensor:
    """The torch framework's augmentation on an NCHW batch: random integer shifts of up to
    ``width_shift * W`` / ``height_shift * H`` pixels each way (zero fill), then a left-right flip of
    each image with probability 1/2; drawn by stateless ops from ``seed`` (two int32)."""
    _, _, h, w = images.shape
    n = tf.shape(images)[0]
    mx, my = int(width_shift * w + 1e-9), int(height_shift * h + 1e-9)
    keys = tf.random.experimental.stateless_split(seed, num=3)
    if mx or my:
        dx = tf.random.stateless_uniform([n], seed=keys[0], minval=-mx, maxval=mx + 1, dtype=tf.int32)
        dy = tf.random.stateless_uniform([n], seed=keys[1], minval=-my, maxval=my + 1, dtype=tf.int32)
        padded = tf.pad(images, [[0, 0], [0, 0], [my, my], [mx, mx]])
        # Output pixel (i, j) is input pixel (i - dy, j - dx), at (i - dy + my, j - dx + mx) when padded.
        rows = tf.range(h)[None, :] - dy[:, None] + my
        cols = tf.range(w)[None, :] - dx[:, None] + mx
        images = tf.gather(tf.gather(padded, rows, axis=2, batch_dims=1), cols, axis=3, batch_dims=1)
    if horizontal_flip:
        flip = tf.random.stateless_uniform([n], seed=keys[2]) < 0.5
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[3]), images)
    return images


class _Reporter(keras.callbacks.Callback):
    """Hands each epoch's start and end to the trial (Keras counts epochs from 0, mlk from 1)."""

    def __init__(self, trial: KerasTrial) -> None:
        super().__init__()
        self.trial = trial

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.trial.begin_epoch(epoch + 1)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.trial.end_epoch(epoch + 1, logs or {}):
            self.model.stop_training = True


class KerasTrial:
    """The training loop of one trial: one ``model.fit`` from the checkpoint's epoch to ``ctx.target``.

    Data parallel (``ctx.distributed``, ``resources.slots_per_trial: N``): the model and optimiser
    are mirrored by a ``MultiWorkerMirroredStrategy`` and each epoch runs the loop of
    :mod:`mlk_plugins.frameworks.keras._distributed` on this rank's shard of every global batch of
    ``framework.batch_size``; every rank reports and saves, the kernel records rank 0's.
    """

    def __init__(self, ctx: TrialContext, config: KerasConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.data: DataSplits | None = None
        self.meta: dict[str, Any] = {}
        self.model: keras.Model | None = None
        self.optimizer: keras.optimizers.Optimizer | None = None
        self.augment: dict[str, Any] | None = None
        self.epoch = 0
        #: This rank's worker in a data-parallel trial (None: one process).
        self.parallel: DataParallel | None = None

    # -- set-up -------------------------------------------------------------------------------------

    def build_optimizer(self) -> keras.optimizers.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return keras.optimizers.SGD(c.lr, momentum=c.momentum, weight_decay=c.weight_decay or None)
        if c.optimizer == "adamw":
            return keras.optimizers.AdamW(c.lr, weight_decay=c.weight_decay)
        return keras.optimizers.Adam(c.lr, weight_decay=c.weight_decay or None)

    def setup(self) -> None:
        """Threads, determinism, data, model (seeded by the trial's seed), optimiser; called by :meth:`run`."""
        set_determinism(self.ctx.deterministic, self.ctx.threads)
        place = self.ctx.distributed
        if place is not None and place.world_size > 1:
            if self.config.jit_compile:
                raise UserError("framework.jit_compile is not supported with resources.slots_per_trial > 1: the "
                                "data-parallel loop's cross-worker all-reduce is not compiled with XLA",
                                where="framework.jit_compile", hint="set framework.jit_compile: false")
            from mlk_plugins.frameworks.keras._distributed import DataParallel

            self.parallel = DataParallel(place)  # before any TensorFlow op: it configures the runtime
        self.data = self.ctx.load_data()
        self.meta = dict(self.data.meta)
        self.augment = augment_settings(self.ctx, self.meta)
        keras.utils.set_random_seed(self.ctx.seed)  # the initial weights
        with self.scope():
            self.model = build_keras_model(self.ctx)
            self.optimizer = self.build_optimizer()
            self.model.compile(optimizer=self.optimizer,
                               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                               metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                               jit_compile=self.config.jit_compile)
            self.optimizer.build(self.model.trainable_variables)

    def scope(self) -> AbstractContextManager[Any]:
        """Where variables are created: mirrored over the ranks of a data-parallel trial."""
        return self.parallel.scope() if self.parallel is not None else nullcontext()

    # -- data -----------------------------------------------------------------------------------

    def steps_per_epoch(self) -> int:
        assert self.data is not None
        n, size = len(self.data.train[1]), self.config.batch_size
        ranks = self.parallel.size if self.parallel is not None else 1
        if 0 < n % size < ranks:  # a rank would train on an empty shard (batch statistics of nothing)
            raise UserError(f"the last batch of the {n} training examples holds {n % size}, fewer than the "
                            f"{ranks} ranks it is split over", where="framework.batch_size",
                            hint="choose a batch_size that leaves a last batch of at least "
                                 "resources.slots_per_trial examples (or none)")
        return -(-n // size)

    def train_dataset(self, first: int, last: int) -> tf.data.Dataset:
        """Epochs ``first``..``last`` of the training split as one stream of batches: each epoch
        shuffled by ``ctx.epoch_seed(epoch)`` and augmented with stateless draws keyed by it."""
        assert self.data is not None
        x, y = self.data.train
        epochs = range(first, last + 1)
        seeds = [self.ctx.epoch_seed(e) for e in epochs]
        orders = np.stack([np.random.default_rng(s).permutation(len(y)) for s in seeds]).astype(np.int64)
        inputs, targets = tf.constant(x), tf.constant(y)
        size, augment = self.config.batch_size, self.augment

        if not augment:  # the lightest pipeline: small batches are dominated by per-element overhead
            stream = tf.data.Dataset.from_tensor_slices(orders).flat_map(
                lambda order: tf.data.Dataset.from_tensor_slices(order).batch(size))
            stream = stream.map(lambda idx: (tf.gather(inputs, idx), tf.gather(targets, idx)))
            return stream.prefetch(tf.data.AUTOTUNE)

        def epoch(order: tf.Tensor, seed: tf.Tensor) -> tf.data.Dataset:
            batches = tf.data.Dataset.from_tensor_slices(order).batch(size).enumerate()
            return batches.map(lambda i, idx: (idx, tf.stack([seed, tf.cast(i, tf.int32)])))

        def batch(idx: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return augment_images(tf.gather(inputs, idx), seed, **augment), tf.gather(targets, idx)

        stream = tf.data.Dataset.from_tensor_slices((orders, np.asarray(seeds, np.int32))).flat_map(epoch)
        # Augmentation is worth a parallel map; deterministic keeps the batches in order.
        stream = stream.map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return stream.prefetch(tf.data.AUTOTUNE)

    def eval_dataset(self, split: str) -> tf.data.Dataset:
        assert self.data is not None
        x, y = getattr(self.data, split)
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(self.config.eval_batch_size)

    # -- the loop -------------------------------------------------------------------------------

    def begin_epoch(self, epoch: int) -> None:
        """Reseed every random layer (dropout) from the epoch's seed, so a resumed trial draws the same.
        Ranks other than 0 of a data-parallel trial draw from their own seeds (their shards differ)."""
        assert self.model is not None
        self.epoch = epoch
        seed = self.ctx.epoch_seed(epoch)
        if self.parallel is not None and self.parallel.rank:
            seed = derive_seed(seed, "rank", self.parallel.rank)
        for i, generator in enumerate(_seed_generators(self.model)):
            generator.state.assign(np.array([derive_seed(seed, "layer", i), 0], dtype=generator.state.dtype))

    def end_epoch(self, epoch: int, logs: dict[str, Any]) -> bool:
        """Report the epoch's metrics and checkpoint when due; True when the trial should stop now."""
        metrics = {"train_loss": logs["loss"], "val_loss": logs["val_loss"], "val_accuracy": logs["val_accuracy"]}
        self.ctx.report(epoch, metrics)
        stop, due = self.agree(self.ctx.should_stop(), self.ctx.checkpoint_due(epoch))
        if due or stop:
            with self.ctx.save_checkpoint(epoch, meta={"framework": "keras"}) as folder:
                self.save(folder)
        return stop

    def agree(self, *flags: bool) -> list[bool]:
        """``flags`` as every rank of a data-parallel trial sees them (each true when true on any
        rank), so all ranks stop or save together and none waits alone in a collective."""
        return self.parallel.any_rank_each(list(flags)) if self.parallel is not None else list(flags)

    def run(self) -> None:
        """Restore the latest checkpoint; then fit up to ``ctx.target``, reporting each epoch and saving
        when ``ctx.checkpoint_due``."""
        self.setup()
        start = self.restore()
        if start >= self.ctx.target:  # a retry of a trial already at its target: nothing to train
            return
        assert self.model is not None
        if self.parallel is not None:
            self.run_parallel(start)
            return
        self.model.fit(self.train_dataset(start + 1, self.ctx.target), epochs=self.ctx.target,
                       initial_epoch=start, steps_per_epoch=self.steps_per_epoch(),
                       validation_data=self.eval_dataset("val"), callbacks=[_Reporter(self)], shuffle=False, verbose=0)

    def run_parallel(self, start: int) -> None:
        """``fit``'s epochs on this rank's shards: train, check the replicas agree, evaluate on val,
        then :meth:`end_epoch` as the single-process loop does."""
        parallel, model, optimizer = self.parallel, self.model, self.optimizer
        assert parallel is not None and model is not None and optimizer is not None
        batches = iter(self.train_dataset(start + 1, self.ctx.target).map(parallel.shard))
        for epoch in range(start + 1, self.ctx.target + 1):
            self.begin_epoch(epoch)
            loss = parallel.train_epoch(model, optimizer, batches, self.steps_per_epoch())
            parallel.check_identical(model.trainable_variables, "weights")
            parallel.share_first(model.non_trainable_variables)
            val = parallel.evaluate(model, optimizer, self.eval_dataset("val"))
            if self.end_epoch(epoch, {"loss": loss, "val_loss": val["loss"], "val_accuracy": val["accuracy"]}):
                break

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Write model and optimiser variables and trial info into ``folder``."""
        assert self.model is not None and self.optimizer is not None
        model_vars, opt_vars = list(self.model.weights), _optimizer_variables(self.optimizer)
        for name, variables in ((MODEL_FILE, model_vars), (OPTIMIZER_FILE, opt_vars)):
            np.savez(folder / name, **_numbered(variables))
        info = {"trial_id": self.ctx.trial_id, "epoch": self.epoch, "keras": keras.__version__,
                "model": _describe(model_vars), "optimizer": _describe(opt_vars)}
        (folder / INFO_FILE).write_text(json.dumps(info, sort_keys=True))

    def load(self, folder: Path) -> None:
        """Read what :meth:`save` wrote. A checkpoint of another trial (a child starting from its
        parent) gives its weights and moments; the learning rate stays this trial's own."""
        assert self.model is not None and self.optimizer is not None
        load_model_weights(self.model, folder, self.ctx.trial_id)
        if (folder / OPTIMIZER_FILE).is_file():
            _assign(_optimizer_variables(self.optimizer), folder / OPTIMIZER_FILE, "optimizer")

    def restore(self) -> int:
        """Load the latest checkpoint if there is one; return its epoch (0 when starting fresh)."""
        with self.ctx.restore_checkpoint() as found:
            if found is None:
                return 0
            folder, resource = found
            self.load(folder)
        self.epoch = resource
        return resource


def load_model_weights(model: keras.Model, folder: Path, trial_id: int) -> None:
    """The model variables of the checkpoint in ``folder`` into ``model``."""
    if not (folder / MODEL_FILE).is_file():
        raise UserError(f"checkpoint of trial {trial_id} has no {MODEL_FILE}; it was not written by the keras "
                        "framework", where="framework.name")
    _assign(list(model.weights), folder / MODEL_FILE, "model")


def _seed_generators(model: keras.Model) -> list[Any]:
    found: list[Any] = []
    for layer in model._flatten_layers(include_self=False):
        found.extend(getattr(layer, "_seed_generators", []))
    return found


def _optimizer_variables(optimizer: keras.optimizers.Optimizer) -> list[Any]:
    rate = getattr(optimizer, "_learning_rate", None)
    return [v for v in optimizer.variables if v is not rate]


def _numbered(variables: list[Any]) -> dict[str, Any]:
    return {f"v{i:03d}": np.asarray(v.numpy()) for i, v in enumerate(variables)}


def _describe(variables: list[Any]) -> list[list[Any]]:
    return [[v.path, [int(d) for d in v.shape]] for v in variables]


def _assign(variables: list[Any], path: Path, what: str) -> None:
    with np.load(path, allow_pickle=False) as saved:
        if len(saved.files) != len(variables):
            raise UserError(f"{path.name} holds {len(saved.files)} {what} variables, the {what} has "
                            f"{len(variables)}: the checkpoint is of another architecture", where="model")
        for i, var in enumerate(variables):
            value = saved[f"v{i:03d}"]
            if tuple(value.shape) != tuple(var.shape):
                raise UserError(f"{what} variable {var.path} has shape {tuple(var.shape)}, the checkpoint "
                                f"{tuple(value.shape)}: the checkpoint is of another architecture", where="model")
            var.assign(value)
