"""The Lightning trainer mlk drives: the module, its batches, the reporting and checkpoint callback,
and Lightning checkpoints as safetensors + JSON.

A checkpoint folder holds ``lightning/`` (Lightning's whole checkpoint dict: ``state_dict``,
``optimizer_states``, ``loops``, ``callbacks``...; tensors in ``checkpoint.safetensors``, the rest
in ``checkpoint.json``, see :func:`mlk_plugins.frameworks.torch.flatten_state`) and ``trial.json``.
Lightning resumes from it with ``Trainer.fit(ckpt_path=...)`` through
:class:`SafetensorsCheckpointIO`, so nothing is pickled or unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_fabric.plugins.environments import LightningEnvironment
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities.model_helpers import is_overridden
from safetensors.torch import load_file, save_file

from mlk.errors import UserError
from mlk.trial import derive_seed
from mlk_plugins.frameworks.torch import ddp
from mlk_plugins.frameworks.torch._impl import (
    _own_storage,
    augment_images,
    augment_settings,
    flatten_state,
    unflatten_state,
)
from mlk_plugins.frameworks.torch._impl import set_determinism as torch_determinism

if TYPE_CHECKING:
    from mlk.compiler import Artifact
    from mlk.trial import TrialContext
    from mlk_plugins.frameworks.lightning import LightningConfig

CHECKPOINT = "lightning"
TENSORS = "checkpoint.safetensors"
SKELETON = "checkpoint.json"
TRIAL_JSON = "trial.json"
#: Checkpoint keys only ``load_from_checkpoint`` uses; dropped when they hold objects JSON cannot.
OPTIONAL_KEYS = ("hyper_parameters", "datamodule_hyper_parameters", "hparams_type")
_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")


def set_determinism(deterministic: bool, threads: int | None = None) -> dict[str, object]:
    """torch's flags (:func:`mlk_plugins.frameworks.torch._impl.set_determinism`) plus Lightning's."""
    flags = torch_determinism(deterministic, threads)
    return {**flags, "lightning.Trainer.deterministic": deterministic,
            "pytorch_lightning.version": pl.__version__}


# -- the module ------------------------------------------------------------------------------------------


class MlkModule(pl.LightningModule):
    """A zoo model (any ``torch.nn.Module`` classifier) as a LightningModule: cross entropy, the
    ``framework:`` optimiser, and exact epoch metrics (``train_loss``, ``val_loss``, ``val_accuracy``:
    means over every example, summed over ranks in float64) in :attr:`mlk_metrics`."""

    def __init__(self, model: torch.nn.Module, options: LightningConfig) -> None:
        super().__init__()
        self.model = model
        self.options = options
        self.mlk_metrics: dict[str, float] = {}
        self._train = [0.0, 0.0]
        self._val = [0.0, 0.0, 0.0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # type: ignore[no-any-return]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        c = self.options
        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        if c.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)

    def _sums(self, values: list[float]) -> list[float]:
        if self.trainer.world_size > 1:
            return ddp.sum_over_ranks(values, self.device)
        return values

    def on_train_epoch_start(self) -> None:
        self._train = [0.0, 0.0]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if len(y):  # an empty shard (a last batch smaller than the world) still steps, adding nothing
            self._train[0] += float(loss.detach()) * len(y)
            self._train[1] += len(y)
        return loss

    def on_train_epoch_end(self) -> None:
        total, count = self._sums(self._train)
        self.mlk_metrics["train_loss"] = total / count if count else math.nan
        self.log("train_loss", self.mlk_metrics["train_loss"])

    def on_validation_epoch_start(self) -> None:
        self._val = [0.0, 0.0, 0.0]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        if not len(y):
            return
        out = self(x)
        self._val[0] += float(F.cross_entropy(out, y)) * len(y)
        self._val[1] += int((out.argmax(dim=1) == y).sum())
        self._val[2] += len(y)

    def on_validation_epoch_end(self) -> None:
        loss, correct, count = self._sums(self._val)
        self.mlk_metrics["val_loss"] = loss / count if count else math.nan
        self.mlk_metrics["val_accuracy"] = correct / count if count else math.nan
        self.log("val_loss", self.mlk_metrics["val_loss"])
        self.log("val_accuracy", self.mlk_metrics["val_accuracy"])


def build_module(ctx: TrialContext, options: LightningConfig) -> pl.LightningModule:
    """The spec's model as a LightningModule: a user's LightningModule as is, an ``nn.Module`` wrapped."""
    torch.manual_seed(ctx.seed)  # the initial weights
    model = ctx.build_model("torch")
    if isinstance(model, pl.LightningModule):
        return model
    if isinstance(model, torch.nn.Module):
        return MlkModule(model, options)
    raise UserError(f"the model built for lightning is a {type(model).__name__}, not a LightningModule or a "
                    "torch.nn.Module", where="model")


# -- batches ---------------------------------------------------------------------------------------------


class TrainBatches:
    """The training split in global batches of ``batch_size``, shuffled (and augmented) with each
    epoch's seed exactly as the torch framework does; in a data-parallel trial, this rank's shard of
    each global batch. Iterated once per epoch by the Trainer, which it reads for the epoch."""

    def __init__(self, ctx: TrialContext, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 augment: dict[str, Any] | None) -> None:
        self.ctx = ctx
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.augment = augment
        self.trainer: pl.Trainer | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def global_size(self, batch_idx: int) -> int:
        return min(self.batch_size, len(self.y) - batch_idx * self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        assert self.trainer is not None
        generator = torch.Generator().manual_seed(self.ctx.epoch_seed(self.trainer.current_epoch + 1))
        order = torch.randperm(len(self.y), generator=generator)
        place = self.ctx.distributed
        for start in range(0, len(self.y), self.batch_size):
            idx = order[start:start + self.batch_size]
            inputs, targets = self.x[idx], self.y[idx]
            if self.augment:
                inputs = augment_images(inputs, generator=generator, **self.augment)
            if place is not None:
                inputs = ddp.shard(inputs, place.rank, place.world_size)
                targets = ddp.shard(targets, place.rank, place.world_size)
            yield inputs, targets


class EvalBatches:
    """A split in order, in batches of ``batch_size``; data parallel: this rank's contiguous shard, cut
    into as many batches on every rank (so ranks make the same number of forward passes)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, place: Any) -> None:
        if place is None:
            self.batches = list(zip(x.split(batch_size), y.split(batch_size)))
        else:
            longest = ddp.shard_sizes(len(y), place.world_size)[0]
            count = max(1, math.ceil(longest / batch_size))
            xs, ys = (ddp.shard(t, place.rank, place.world_size).tensor_split(count) for t in (x, y))
            self.batches = list(zip(xs, ys))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)


# -- checkpoints -------------------------------------------------------------------------------------------


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning's checkpoint dict as a folder of safetensors + JSON (no pickle either way)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = dict(checkpoint)
        for key in OPTIONAL_KEYS:
            if key in state:
                try:
                    flatten_state(state[key])
                except TypeError:
                    del state[key]
        tensors, skeleton = flatten_state(state)
        save_file(_own_storage(tensors), str(folder / TENSORS))
        (folder / SKELETON).write_text(json.dumps(skeleton, sort_keys=True))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        folder = Path(path)
        if not (folder / SKELETON).is_file():
            raise UserError(f"{folder} holds no Lightning checkpoint written by mlk; was the trial trained by "
                            "another framework?", where="framework.name")
        tensors = load_file(str(folder / TENSORS), device=str(map_location) if map_location else "cpu") \
            if (folder / TENSORS).is_file() else {}
        return dict(unflatten_state(json.loads((folder / SKELETON).read_text()), tensors))

    def remove_checkpoint(self, path: Any) -> None:
        shutil.rmtree(Path(path), ignore_errors=True)


class MlkCallback(pl.callbacks.Checkpoint):
    """Seeds each epoch, reports each epoch's metrics to mlk and, when due, saves the checkpoint
    through mlk's storage; combines the ranks' gradients by their share of each global batch; stops when mlk
    asks (every rank together).

    A :class:`~pytorch_lightning.callbacks.Checkpoint`, so Lightning calls its ``on_train_epoch_end``
    after the module's (where the module logs its epoch metrics) and adds no checkpoint callback
    of its own.
    """

    def __init__(self, ctx: TrialContext, batches: TrainBatches | None, foreign_start: bool) -> None:
        self.ctx = ctx
        self.batches = batches
        self.foreign_start = foreign_start
        self.weight = ddp.ShardWeight()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        place = self.ctx.distributed
        if place is not None and self.batches is not None:
            ddp.register_hook(trainer.strategy.model, self.weight)
        if self.foreign_start:  # a child trial keeps its own optimiser settings, takes the parent's moments
            fresh = _optimizers(pl_module.configure_optimizers())
            for opt, new in zip(trainer.optimizers, fresh):
                for group, own in zip(opt.param_groups, new.param_groups):
                    group.update({k: v for k, v in own.items() if k != "params"})

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed = self.ctx.epoch_seed(trainer.current_epoch + 1)
        place = self.ctx.distributed
        torch.manual_seed(seed if place is None or place.rank == 0 else derive_seed(seed, "rank", place.rank))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        place = self.ctx.distributed
        if place is not None and self.batches is not None:
            total = self.batches.global_size(batch_idx)
            self.weight.set(ddp.shard_sizes(total, place.world_size)[place.rank], total)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if isinstance(v, torch.Tensor) and v.numel() == 1}
        metrics.update(getattr(pl_module, "mlk_metrics", {}))
        self.ctx.report(epoch, metrics)
        # Every rank takes the same decisions (true when true on any rank).
        stop = trainer.strategy.reduce_boolean_decision(self.ctx.should_stop(), all=False)
        due = trainer.strategy.reduce_boolean_decision(self.ctx.checkpoint_due(epoch), all=False)
        if due or stop:
            with self.ctx.save_checkpoint(epoch, meta={"framework": "lightning"}) as folder:
                trainer.save_checkpoint(str(folder / CHECKPOINT))  # every rank: it ends in a barrier
                if self.ctx.is_main:
                    info = {"trial_id": self.ctx.trial_id, "epoch": epoch, "lightning": pl.__version__}
                    (folder / TRIAL_JSON).write_text(json.dumps(info, sort_keys=True))
        if stop:
            trainer.should_stop = True


def _optimizers(configured: Any) -> list[torch.optim.Optimizer]:
    """The optimisers in what ``configure_optimizers`` returned (one, a sequence, or dicts)."""
    if isinstance(configured, torch.optim.Optimizer):
        return [configured]
    if isinstance(configured, dict):
        return _optimizers(configured.get("optimizer"))
    if isinstance(configured, (list, tuple)):
        return [o for item in configured for o in _optimizers(item)]
    return []


# -- the trial -----------------------------------------------------------------------------------------------


def _quiet() -> None:
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def build_trainer(ctx: TrialContext, callback: MlkCallback, root: Path) -> pl.Trainer:
    """A Trainer to ``ctx.target`` epochs, without progress bars, loggers or model summaries; Lightning's
    DDP strategy over the kernel's rank processes when the trial is data parallel."""
    kwargs: dict[str, Any] = {}
    place = ctx.distributed
    if place is not None:
        # The kernel started the processes (LOCAL_RANK etc. are set): Lightning joins them.
        kwargs = {"strategy": DDPStrategy(cluster_environment=LightningEnvironment(), timeout=ddp.TIMEOUT),
                  "devices": place.world_size, "num_nodes": 1}
    return pl.Trainer(
        max_epochs=ctx.target, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=True, callbacks=[callback],
        plugins=[SafetensorsCheckpointIO()], deterministic=ctx.deterministic, use_distributed_sampler=False,
        num_sanity_val_steps=0, default_root_dir=str(root), **kwargs,
    )


def _tensors(split: tuple[Any, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(split[0], dtype=torch.float32), torch.as_tensor(split[1], dtype=torch.int64)


def train(ctx: TrialContext, options: LightningConfig) -> None:
    """Train ``ctx``'s trial from its latest checkpoint (or scratch) up to ``ctx.target`` epochs."""
    from pytorch_lightning.utilities.warnings import PossibleUserWarning

    _quiet()
    set_determinism(ctx.deterministic, ctx.threads)
    data = ctx.load_data()
    module = build_module(ctx, options)
    own_data = is_overridden("train_dataloader", module)
    batches: TrainBatches | None = None
    loaders: dict[str, Any] = {}
    if not own_data:
        tx, ty = _tensors(data.train)
        vx, vy = _tensors(data.val)
        batches = TrainBatches(ctx, tx, ty, options.batch_size, augment_settings(ctx.data, dict(data.meta)))
        loaders = {"train_dataloaders": batches,
                   "val_dataloaders": EvalBatches(vx, vy, options.eval_batch_size, ctx.distributed)}
    root = Path(tempfile.mkdtemp(prefix=f"mlk-lightning-{ctx.trial_id}-"))
    try:
        with ctx.restore_checkpoint() as found:
            ckpt_path = None
            foreign = False
            if found is not None:
                folder, resource = found
                if resource >= ctx.target:  # a retry of a trial already at its target trains nothing
                    return
                if not (folder / CHECKPOINT).is_dir():
                    raise UserError(f"checkpoint of trial {ctx.trial_id} has no '{CHECKPOINT}' folder; it was not "
                                    "written by the lightning framework", where="framework.name")
                ckpt_path = str(folder / CHECKPOINT)
                info = json.loads((folder / TRIAL_JSON).read_text()) if (folder / TRIAL_JSON).is_file() else {}
                foreign = info.get("trial_id") != ctx.trial_id
            callback = MlkCallback(ctx, batches, foreign)
            trainer = build_trainer(ctx, callback, root)
            if batches is not None:
                batches.trainer = trainer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PossibleUserWarning)
                warnings.filterwarnings("ignore", message=".*does not have many workers.*")
                warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
                trainer.fit(module, ckpt_path=ckpt_path, **loaders)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def export_trial(ctx: TrialContext, options: LightningConfig, resource: int, out: Path) -> Artifact:
    """The trial's network at its checkpoint ``resource`` as a ``torch`` artifact: a zoo model's own
    ``nn.Module`` (so :func:`mlk_plugins.frameworks.torch.artifacts.load_module` rebuilds it), or the
    user's LightningModule."""
    from mlk.errors import MlkError
    from mlk_plugins.frameworks.torch.artifacts import write_artifact

    _quiet()
    torch_determinism(ctx.deterministic, ctx.threads)
    data = ctx.load_data()
    module = build_module(ctx, options)
    with ctx.restore_checkpoint(resource) as found:
        if found is None:
            raise MlkError(f"trial {ctx.trial_id} has no checkpoint at {resource} epochs to export "
                           "(storage.keep.trial_best must keep it)")
        checkpoint = SafetensorsCheckpointIO().load_checkpoint(found[0] / CHECKPOINT)
    module.load_state_dict(checkpoint["state_dict"])
    net = module.model if isinstance(module, MlkModule) else module
    meta: dict[str, Any] = {k: data.meta[k] for k in ("input_shape", "num_classes", "layout") if k in data.meta}
    meta.update({"trial_id": ctx.trial_id, "resource": resource, "classes": data.meta.get("classes")})
    rebuild = {"model": ctx.model, "meta": dict(data.meta)}
    return write_artifact(net, out, None, meta, rebuild, f"export trial {ctx.trial_id} @ {resource}")
