"""The torch training loop (:class:`TorchTrial`), its augmentation and its checkpoint format.

A checkpoint folder holds:

- ``model.safetensors``: the model's ``state_dict``; its metadata ``mlk.trial`` (JSON) says which
  trial wrote it, at which epoch, with which torch;
- ``optimizer.safetensors``: the optimiser's ``state_dict``, its tensors under path-like keys
  (``state/0/exp_avg``) and everything else as JSON in its metadata ``mlk.optimizer``.

Two files, so a save costs two uploads (each flushed to disk) besides the manifest. Checkpoints of
earlier versions kept the JSON parts in ``optimizer.json`` and ``trial.json``; they still load.
Nothing is pickled, so loading a checkpoint never runs code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from mlk.errors import UserError
from mlk.trial import derive_seed
from mlk_plugins.frameworks.torch import ddp

if TYPE_CHECKING:
    from mlk.datasets import DataSplits
    from mlk.trial import TrialContext
    from mlk_plugins.frameworks.torch import TorchConfig

MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "mlk.optimizer"
TRIAL_META = "mlk.trial"
#: Where earlier versions kept the optimiser's skeleton and the trial's info (still read).
OPTIMIZER_JSON = "optimizer.json"
TRIAL_JSON = "trial.json"
SPLITS = ("train", "val", "test")

Batch = tuple[torch.Tensor, torch.Tensor]
Batches = Iterable[Batch]


def set_determinism(deterministic: bool, threads: int | None = None) -> dict[str, object]:
    """Switch torch's deterministic algorithms (and thread count); return the flags, for provenance."""
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing, run to run
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on CUDA >= 10.2
    cuda = torch.cuda.is_available()
    return {
        "torch.use_deterministic_algorithms": deterministic,
        "torch.backends.cudnn.deterministic": torch.backends.cudnn.deterministic,
        "torch.backends.cudnn.benchmark": torch.backends.cudnn.benchmark,
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "torch.num_threads": torch.get_num_threads(),
        "torch.version": torch.__version__,
        "device": "cuda" if cuda else "cpu",
        # On CPU the same seed gives the same bits; CUDA's deterministic kernels repeat on one GPU model
        # and library version, not across them.
        "bit_exact": ("yes (CPU)" if not cuda else "same GPU model and CUDA/cuDNN versions only")
        if deterministic else "no (reproducibility.deterministic is off)",
    }


def seed_global(seed: int) -> None:
    """Seed torch's global generator for an epoch (dropout draws from it). This loop trains on the CPU,
    so while no GPU is initialised only the CPU generator is seeded: ``torch.manual_seed`` also queues
    lazy CUDA and XPU seeding, with a stack trace each, ~0.2 ms per epoch."""
    if torch.cuda.is_initialized():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def trial_for(ctx: TrialContext, config: TorchConfig) -> TorchTrial:
    """The trial object for ``ctx``: ``config.trial``'s class when set, else :class:`TorchTrial`."""
    cls: Any = TorchTrial
    if config.trial:
        from mlk.imports import import_object

        cls = import_object(config.trial, where="framework.trial")
        if not (isinstance(cls, type) and issubclass(cls, TorchTrial)):
            raise UserError(
                f"'{config.trial}' is not a subclass of mlk_plugins.frameworks.torch.TorchTrial",
                where="framework.trial",
                hint="write `class MyTrial(TorchTrial)` and override build_model, build_optimizer, loss, "
                "train_batch or evaluate",
            )
    return cls(ctx, config)


class TorchTrial:
    """The training loop of one trial. Subclass it for a custom loop and name the subclass in the
    spec (``framework.trial: "mypkg.train:MyTrial"``); override only what differs:

    - :meth:`build_model` (``self``) -> ``torch.nn.Module``; default: the spec's ``model:``.
    - :meth:`build_optimizer` (``self, model``) -> ``torch.optim.Optimizer``; default: from the
      ``framework:`` options.
    - :meth:`loss` (``self, outputs, targets``) -> the batch's mean loss, a scalar tensor.
    - :meth:`train_batch` (``self, inputs, targets``) -> float: one optimisation step on one
      batch, returning its mean loss.
    - :meth:`evaluate` (``self, loader``) -> ``{"loss": ..., "accuracy": ..., ...}`` over an
      iterable of ``(inputs, targets)`` batches; every key is reported as ``val_<key>``.

    Available on ``self``: ``ctx`` (the :class:`mlk.trial.TrialContext`), ``config`` (the
    validated ``framework:`` options), ``data`` (the :class:`mlk.datasets.DataSplits`), ``meta``
    (the dataset's meta), ``model``, ``optimizer``, ``epoch`` (the epoch being trained) and
    ``augment`` (the active augmentation settings, or None).

    The loop seeds everything random in an epoch (shuffle order, augmentation, dropout) from
    ``ctx.epoch_seed(epoch)``, so an override that draws random numbers from ``torch``'s global
    generator or from ``self.generator`` stays reproducible across resumes.

    Data parallel (``resources.slots_per_trial: N``): ``self.model`` is wrapped in
    DistributedDataParallel, each rank trains on its shard of every global batch of
    ``framework.batch_size`` (see :mod:`mlk_plugins.frameworks.torch.ddp`), evaluation is sharded
    and combined, and only rank 0 writes checkpoints; overrides need no change. ``self.module`` is
    the unwrapped network.
    """

    def __init__(self, ctx: TrialContext, config: TorchConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.data: DataSplits | None = None
        self.meta: dict[str, Any] = {}
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.epoch = 0
        self.augment: dict[str, Any] | None = None
        self.generator: torch.Generator | None = None
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        #: This process's place in a data-parallel trial (None: one process).
        self.place = ctx.distributed
        self.shard_weight = ddp.ShardWeight()

    @property
    def module(self) -> torch.nn.Module:
        """The network being trained, without its DistributedDataParallel wrapper."""
        assert self.model is not None
        return ddp.unwrap(self.model)

    # -- what a subclass overrides --------------------------------------------------------------

    def build_model(self) -> torch.nn.Module:
        """The network to train; by default the spec's ``model:`` built for torch."""
        model = self.ctx.build_model("torch")
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"the model built for torch is a {type(model).__name__}, not a torch.nn.Module",
                            where="model")
        return model

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The optimiser of ``model``'s parameters, from ``framework.optimizer``, ``lr``, ``momentum``
        and ``weight_decay``."""
        c = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        if c.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch (``framework.loss``: cross entropy over class logits)."""
        return F.cross_entropy(outputs, targets)

    def train_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimisation step on one batch; returns the batch's mean loss."""
        assert self.model is not None and self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.model(inputs), targets)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def evaluate(self, loader: Batches) -> dict[str, float]:
        """Mean ``loss`` and ``accuracy`` (argmax of the outputs) over ``loader``'s batches, in eval mode."""
        assert self.model is not None
        was_training = self.model.training
        self.model.eval()
        total, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for inputs, targets in loader:
                outputs = self.model(inputs)
                total += float(self.loss(outputs, targets)) * len(targets)
                correct += int((outputs.argmax(dim=1) == targets).sum())
                count += len(targets)
        self.model.train(was_training)
        if not count:
            return {"loss": float("nan"), "accuracy": float("nan")}
        return {"loss": total / count, "accuracy": correct / count}

    # -- data ---------------------------------------------------------------------------------------

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of ``split`` as tensors (sharing memory with the dataset's arrays)."""
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}'", choices=SPLITS, got=split)
        if split not in self._tensors:
            assert self.data is not None
            x, y = getattr(self.data, split)
            self._tensors[split] = (torch.as_tensor(x, dtype=torch.float32),
                                    torch.as_tensor(y, dtype=torch.int64))
        return self._tensors[split]

    def batches(self, split: str, batch_size: int | None = None) -> Iterator[Batch]:
        """``split`` in order, in batches of ``batch_size`` (default ``framework.eval_batch_size``);
        in a data-parallel trial, this rank's contiguous shard of it."""
        x, y = self.tensors(split)
        if self.place is not None:
            x, y = (ddp.shard(t, self.place.rank, self.place.world_size) for t in (x, y))
        size = batch_size or self.config.eval_batch_size
        for start in range(0, len(y), size):
            yield x[start:start + size], y[start:start + size]

    def train_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        """The training split shuffled by ``generator``, in batches of ``framework.batch_size``, augmented
        (when ``data.augment`` asks) with draws from the same generator."""
        x, y = self.tensors("train")
        for idx in torch.randperm(len(y), generator=generator).split(self.config.batch_size):
            inputs, targets = x[idx], y[idx]
            if self.augment:
                inputs = augment_images(inputs, generator=generator, **self.augment)
            if self.place is not None:  # this rank's share of the global batch
                rank, world = self.place.rank, self.place.world_size
                self.shard_weight.set(len(ddp.shard(targets, rank, world)), len(targets))
                inputs, targets = ddp.shard(inputs, rank, world), ddp.shard(targets, rank, world)
            yield inputs, targets

    # -- the loop -------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Threads, determinism, data, model and optimiser; called once by :meth:`run`."""
        set_determinism(self.ctx.deterministic, self.ctx.threads)
        self.data = self.ctx.load_data()
        self.meta = dict(self.data.meta)
        self.augment = self._augment_settings()
        torch.manual_seed(self.ctx.seed)  # the initial weights
        self.model = self.build_model()
        self.optimizer = self.build_optimizer(self.model)
        if self.place is not None:
            ddp.init(self.place, backend="gloo")  # this loop trains on CPU, whatever GPUs exist
            self.model = ddp.wrap(self.model, self.shard_weight)

    def train_epoch(self, epoch: int) -> float:
        """Train one epoch with its own seed; return the mean training loss."""
        assert self.model is not None
        self.epoch = epoch
        seed = self.ctx.epoch_seed(epoch)
        self.generator = torch.Generator().manual_seed(seed)
        # Dropout and anything else drawing from the global generator; other ranks draw their own.
        seed_global(seed if self.place is None or self.place.rank == 0 else derive_seed(seed, "rank", self.place.rank))
        self.model.train()
        total, count = 0.0, 0.0
        for inputs, targets in self.train_batches(self.generator):
            loss = self.train_batch(inputs, targets)  # every rank steps, even on an empty shard
            if len(targets):
                total += loss * len(targets)
                count += len(targets)
        if self.place is not None:
            total, count = ddp.sum_over_ranks([total, count])
        return total / count if count else float("nan")

    def evaluate_split(self, split: str) -> dict[str, float]:
        """:meth:`evaluate` on ``split`` (``val`` or ``test``), keys prefixed ``<split>_``.

        Data parallel: each rank evaluates its shard with the unwrapped network, and the metrics
        (means over examples) are combined weighted by shard size.
        """
        if self.place is None:
            return {f"{split}_{k}": v for k, v in self.evaluate(self.batches(split)).items()}
        wrapped, self.model = self.model, self.module
        try:
            local = self.evaluate(self.batches(split))
        finally:
            self.model = wrapped
        n = len(ddp.shard(self.tensors(split)[1], self.place.rank, self.place.world_size))
        keys = sorted(local)
        sums = ddp.sum_over_ranks([local[k] * n if n else 0.0 for k in keys] + [float(n)])
        total = sums[-1]
        return {f"{split}_{k}": (v / total if total else float("nan")) for k, v in zip(keys, sums)}

    def run(self) -> None:
        """Restore the latest checkpoint; then train and report each epoch to ``ctx.target``, checkpointing
        when ``ctx.checkpoint_due``."""
        ctx = self.ctx
        self.setup()
        start = self.restore()
        # A retry of a trial already at its target trains nothing; the kernel keeps its last report.
        for epoch in range(start + 1, ctx.target + 1):
            metrics = {"train_loss": self.train_epoch(epoch), **self.evaluate_split("val")}
            ctx.report(epoch, metrics)
            stop, due = self.agree(ctx.should_stop(), ctx.checkpoint_due(epoch))
            if due or stop:
                with ctx.save_checkpoint(epoch, meta={"framework": "torch"}) as folder:
                    self.save(folder)
            if stop:
                break

    def agree(self, *flags: bool) -> list[bool]:
        """``flags`` as every rank of a data-parallel trial sees them (each true when true on any
        rank), so all ranks stop or save together and none waits alone in a collective."""
        return ddp.any_rank_each(list(flags)) if self.place is not None else list(flags)

    def evaluate_checkpoint(self, split: str = "test") -> dict[str, float]:
        """Metrics on ``split`` of the trial's latest checkpoint (without training)."""
        self.setup()
        if not self.restore():
            raise UserError(f"trial {self.ctx.trial_id} has no checkpoint to evaluate",
                            hint="train it first (its checkpoints may have been deleted by storage.keep)")
        return self.evaluate_split(split)

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Write model, optimiser and trial info into ``folder`` (safetensors and JSON); only on rank 0
        of a data-parallel trial (the replicas are identical)."""
        assert self.model is not None and self.optimizer is not None
        if not self.ctx.is_main:
            return
        info = {"trial_id": self.ctx.trial_id, "epoch": self.epoch, "torch": torch.__version__}
        save_file(_own_storage(self.module.state_dict()), str(folder / MODEL_FILE),
                  metadata={TRIAL_META: json.dumps(info, sort_keys=True)})
        tensors, skeleton = flatten_state(self.optimizer.state_dict())
        save_file(_own_storage(tensors), str(folder / OPTIMIZER_TENSORS),
                  metadata={OPTIMIZER_META: json.dumps(skeleton, sort_keys=True)})

    def load(self, folder: Path) -> None:
        """Read what :meth:`save` wrote into the model and optimiser.

        A checkpoint of another trial (a child starting from its parent) keeps this trial's own
        optimiser hyperparameters (``lr``...), taking only the parent's weights and moments.
        """
        assert self.model is not None and self.optimizer is not None
        if not (folder / MODEL_FILE).is_file():
            raise UserError(f"checkpoint of trial {self.ctx.trial_id} has no {MODEL_FILE}; "
                            "it was not written by the torch framework", where="framework.name")
        weights, model_meta = _read_safetensors(folder / MODEL_FILE)
        self.module.load_state_dict(weights)
        has_tensors = (folder / OPTIMIZER_TENSORS).is_file()
        tensors, optimizer_meta = _read_safetensors(folder / OPTIMIZER_TENSORS) if has_tensors else ({}, {})
        skeleton = _json_meta(optimizer_meta, OPTIMIZER_META, folder / OPTIMIZER_JSON)
        if skeleton is not None:
            fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(unflatten_state(skeleton, tensors))
            info = _json_meta(model_meta, TRIAL_META, folder / TRIAL_JSON) or {}
            if info.get("trial_id") != self.ctx.trial_id:
                for group, own in zip(self.optimizer.param_groups, fresh):
                    group.update(own)

    def restore(self) -> int:
        """Load the latest checkpoint if there is one; return its epoch (0 when starting fresh)."""
        with self.ctx.restore_checkpoint() as found:
            if found is None:
                return 0
            folder, resource = found
            self.load(folder)
        self.epoch = resource
        return resource

    def _augment_settings(self) -> dict[str, Any] | None:
        return augment_settings(self.ctx.data, self.meta)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata, in one read."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _json_meta(metadata: dict[str, str], key: str, legacy: Path) -> Any:
    """The JSON under ``key`` in a safetensors file's ``metadata``, or (a checkpoint of an earlier
    version) in the ``legacy`` file; None when neither holds it."""
    if key in metadata:
        return json.loads(metadata[key])
    return json.loads(legacy.read_text()) if legacy.is_file() else None


def augment_settings(data: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any] | None:
    """The keyword arguments of :func:`augment_images` that ``data.augment`` asks for; None for none."""
    raw = data.get("augment") or {}
    settings = {
        "width_shift": float(raw.get("width_shift", 0.0)),
        "height_shift": float(raw.get("height_shift", 0.0)),
        "horizontal_flip": bool(raw.get("horizontal_flip", False)),
    }
    if not any(settings.values()):
        return None
    if meta.get("layout") != "nchw":
        raise UserError(f"augmentation needs images (layout nchw); dataset '{data.get('name')}' "
                        f"gives layout {meta.get('layout')!r}", where="data.augment")
    return settings


# -- augmentation ---------------------------------------------------------------------------------


def shift_images(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Translate image ``n`` of an NCHW batch by ``dx[n]`` pixels right and ``dy[n]`` down (negative:
    left, up); pixels shifted in are zero."""
    n, _, h, w = images.shape
    if n == 0:
        return images
    mx, my = int(dx.abs().max()), int(dy.abs().max())
    padded = F.pad(images, (mx, mx, my, my))
    # Output pixel (i, j) is input pixel (i - dy, j - dx), found at (i - dy + my, j - dx + mx) when padded.
    rows = torch.arange(h)[None, :] - dy[:, None] + my
    cols = torch.arange(w)[None, :] - dx[:, None] + mx
    picked = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # N, H, W, C
    return picked.permute(0, 3, 1, 2).contiguous()


def augment_images(images: torch.Tensor, *, width_shift: float = 0.0, height_shift: float = 0.0,
                   horizontal_flip: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random integer shifts of up to ``width_shift * W`` / ``height_shift * H`` pixels each way (zero
    fill), then a left-right flip of each image with probability 1/2; all drawn from ``generator``."""
    n, _, h, w = images.shape
    # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 at 29.
    mx, my = int(width_shift * w + 1e-9), int(height_shift * h + 1e-9)
    if mx or my:
        dx = torch.randint(-mx, mx + 1, (n,), generator=generator)
        dy = torch.randint(-my, my + 1, (n,), generator=generator)
        images = shift_images(images, dx, dy)
    if horizontal_flip:
        flip = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return images


# -- optimiser state without pickle ------------------------------------------------------------------

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (an optimiser's ``state_dict``) into tensors and a JSON-able skeleton.

    Tensors are named by their path (``state/0/exp_avg``) and replaced by ``{"__tensor__": name}``;
    tuples become ``{"__tuple__": [...]}`` and dicts with non-string keys (the optimiser's
    ``state`` is keyed by int) ``{"__items__": [[key, value], ...]}``, so :func:`unflatten_state`
    gives back exactly the same structure and types.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj: Any, path: tuple[str, ...]) -> Any:
        if isinstance(obj, torch.Tensor):
            name = "/".join(path) or "tensor"
            if name in tensors:
                raise ValueError(f"two tensors of the state map to the same name '{name}'")
            tensors[name] = obj.detach()
            return {_TENSOR: name}
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: encode(v, (*path, k)) for k, v in obj.items()}
            return {_ITEMS: [[encode(k, (*path, "key")), encode(v, (*path, str(k)))] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {_TUPLE: [encode(v, (*path, str(i))) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [encode(v, (*path, str(i))) for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store a {type(obj).__name__} (at '{'/'.join(path)}') in a checkpoint "
                        "without pickle; use tensors, numbers, strings, lists, tuples and dicts")

    return tensors, encode(state, ())


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`flatten_state`."""

    def decode(obj: Any) -> Any:
        if isinstance(obj, dict):
            if len(obj) == 1 and _TENSOR in obj:
                return tensors[obj[_TENSOR]]
            if len(obj) == 1 and _TUPLE in obj:
                return tuple(decode(v) for v in obj[_TUPLE])
            if len(obj) == 1 and _ITEMS in obj:
                return {decode(k): decode(v) for k, v in obj[_ITEMS]}
            return {k: decode(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        return obj

    return decode(skeleton)


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, copying any that shares memory with an earlier one (tied weights), which
    safetensors refuses to write."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out
