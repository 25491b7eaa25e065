"""The JAX training loop (:class:`JaxTrial`): Flax linen module, optax optimiser, jitted steps.

A checkpoint folder holds:

- ``params.npz``: the parameter pytree, one array per leaf under its path (``fc1/kernel``);
- ``optimizer.npz``: the optax state's leaves (step counts, moments) in tree order, ``v000``...;
- ``jax.json``: the leaves' paths and shapes (checked on load), the trial and its epoch.

Pytrees are rebuilt on the structure of a freshly initialised state, and ``np.load(...,
allow_pickle=False)`` reads the arrays, so loading a checkpoint never runs code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from mlk.errors import UserError

if TYPE_CHECKING:
    from mlk.datasets import DataSplits
    from mlk.trial import TrialContext
    from mlk_plugins.frameworks.jax import JaxConfig

PARAMS_FILE = "params.npz"
OPTIMIZER_FILE = "optimizer.npz"
INFO_FILE = "jax.json"


def determinism_flags(deterministic: bool) -> dict[str, object]:
    """What makes a JAX trial reproducible here, for provenance. JAX has no global random state:
    every draw takes an explicit key, and XLA's CPU kernels are deterministic for a fixed thread
    count, so there is nothing to switch; ``deterministic`` is recorded as asked."""
    return {
        "deterministic": deterministic,
        "jax.random": "explicit keys: trial seed for the initial parameters, epoch seed split into a "
                      "(dropout, augmentation) key pair per step",
        **{flag: _config(flag) for flag in ("jax_default_prng_impl", "jax_threefry_partitionable",
                                            "jax_enable_x64")},
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "jax.backend": jax.default_backend(),
        "jax.version": jax.__version__,
        "flax.version": flax.__version__,
        "optax.version": optax.__version__,
    }


def _config(flag: str) -> object:
    value = getattr(jax.config, flag)
    return value if isinstance(value, (bool, int, float)) else str(value)


def build_flax_model(ctx: TrialContext) -> nn.Module:
    """The spec's ``model:`` built for jax, checked to be a ``flax.linen.Module``."""
    model = ctx.build_model("jax")
    if not isinstance(model, nn.Module):
        raise UserError(f"the model built for jax is a {type(model).__name__}, not a flax.linen.Module",
                        where="model")
    return model


def init_params(model: nn.Module, seed: int, input_shape: list[int]) -> Any:
    """The module's parameters, initialised from ``jax.random.key(seed)``."""
    example = jnp.zeros((1, *(int(d) for d in input_shape)), jnp.float32)
    return model.init(jax.random.key(seed), example, train=False)["params"]


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


def augment_images(images: Any, key: Any, *, width_shift: float = 0.0, height_shift: float = 0.0,
                   horizontal_flip: bool = False) -> Any:
    """The torch framework's augmentation on an NCHW batch: random integer shifts of up to
    ``width_shift * W`` / ``height_shift * H`` pixels each way (zero fill), then a left-right flip of
    each image with probability 1/2; drawn from ``key``."""
    n, _, h, w = images.shape
    mx, my = int(width_shift * w + 1e-9), int(height_shift * h + 1e-9)
    kx, ky, kf = jax.random.split(key, 3)
    if mx or my:
        dx = jax.random.randint(kx, (n,), -mx, mx + 1)
        dy = jax.random.randint(ky, (n,), -my, my + 1)
        padded = jnp.pad(images, ((0, 0), (0, 0), (my, my), (mx, mx)))
        # Output pixel (i, j) is input pixel (i - dy, j - dx), at (i - dy + my, j - dx + mx) when padded.
        rows = jnp.arange(h)[None, :] - dy[:, None] + my
        cols = jnp.arange(w)[None, :] - dx[:, None] + mx
        images = padded[jnp.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # N, H, W, C
        images = jnp.transpose(images, (0, 3, 1, 2))
    if horizontal_flip:
        flip = jax.random.uniform(kf, (n,)) < 0.5
        images = jnp.where(flip[:, None, None, None], images[..., ::-1], images)
    return images


def build_optimizer(config: JaxConfig) -> optax.GradientTransformation:
    """``framework.optimizer`` as optax: L2 added to the gradient for sgd and adam (as torch does),
    decoupled weight decay for adamw."""
    if config.optimizer == "adamw":
        return optax.adamw(config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        step = optax.sgd(config.lr, momentum=config.momentum or None)
    else:
        step = optax.adam(config.lr)
    return optax.chain(optax.add_decayed_weights(config.weight_decay), step) if config.weight_decay else step


#: The jitted (train step, eval step) of the last model and optimiser this process trained.
_STEPS: dict[Any, tuple[Any, Any]] = {}


def train_step(model: nn.Module, tx: optax.GradientTransformation, augment: dict[str, Any] | None) -> Any:
    """One optimisation step on the examples ``idx`` of ``inputs``/``targets`` (on the device).
    ``mask`` marks the real ones when the batch is padded (a data-parallel trial pads its last batch,
    so every batch splits evenly over the ranks), and is None when every example is real. ``keys``
    is the raw data of the step's (dropout, augmentation) key pair (:func:`step_keys`)."""

    def step(params: Any, opt_state: Any, inputs: Any, targets: Any, idx: Any, mask: Any, keys: Any) -> Any:
        x, y = inputs[idx], targets[idx]
        drop_key, aug_key = jax.random.wrap_key_data(keys)
        if augment:
            x = augment_images(x, aug_key, **augment)

        def loss_fn(p: Any) -> Any:
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": drop_key})
            return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, y), mask)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def masked_mean(values: Any, mask: Any) -> Any:
    """The mean of ``values`` over the entries ``mask`` marks (all of them when ``mask`` is None)."""
    return values.mean() if mask is None else (values * mask).sum() / mask.sum()


def masked_sum(values: Any, mask: Any) -> Any:
    """The sum of ``values`` over the entries ``mask`` marks (all of them when ``mask`` is None)."""
    return values.sum() if mask is None else (values * mask).sum()


def step_keys(seed: int, steps: int) -> np.ndarray:
    """The raw data (``steps`` x 2 x key) of one (dropout, augmentation) key pair per step of an
    epoch, split from ``jax.random.key(seed)`` in one call. Each step gets its row as a numpy
    array: deriving the pair inside the jitted step (``fold_in`` the step number, then ``split``)
    adds some thirty small XLA operations to it, about 3 % of a CIFAR CNN step on one CPU thread."""
    return np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), (max(steps, 1), 2))))


def eval_step(model: nn.Module) -> Any:
    """Summed loss and correct predictions over the examples ``idx`` of ``inputs``/``targets`` (those
    ``mask`` marks, when it is not None)."""

    def step(params: Any, inputs: Any, targets: Any, idx: Any, mask: Any) -> Any:
        x, y = inputs[idx], targets[idx]  # gathered inside the jitted call: eager indexing costs ms
        logits: Any = model.apply({"params": params}, x, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return masked_sum(losses, mask), masked_sum(logits.argmax(axis=1) == y, mask)

    return step


def padded_batches(order: np.ndarray, size: int, pad: bool = True) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """``order`` in batches of ``size`` indices. With ``pad`` the last batch is padded to ``size``
    and each batch comes with a mask of its real examples (one shape: what a batch split over ranks
    needs); without, the last batch keeps its own size, which costs one more compilation but no
    computation on padding, and the masks are None."""
    batches: list[tuple[np.ndarray, np.ndarray | None]] = []
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        if not pad:
            batches.append((idx, None))
            continue
        mask = np.ones(size, np.float32)
        if len(idx) < size:
            mask[len(idx):] = 0.0
            idx = np.concatenate([idx, np.zeros(size - len(idx), idx.dtype)])
        batches.append((idx, mask))
    return batches


class JaxTrial:
    """The training loop of one trial: jitted steps over batches gathered on the device."""

    def __init__(self, ctx: TrialContext, config: JaxConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.data: DataSplits | None = None
        self.meta: dict[str, Any] = {}
        self.model: nn.Module | None = None
        self.tx: optax.GradientTransformation | None = None
        self.params: Any = None
        self.opt_state: Any = None
        self.epoch = 0
        self.parallel: Any = None
        self._arrays: dict[str, tuple[Any, Any]] = {}
        self._train: tuple[Any, Any] | None = None

    # -- set-up -------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Data, model, parameters (from the trial's seed), optimiser and the jitted steps; with
        ``ctx.distributed``, this rank joins the trial's others first."""
        place = self.ctx.distributed
        if place is not None and place.world_size > 1:
            if self.config.batch_size % place.world_size:
                raise UserError(f"framework.batch_size {self.config.batch_size} does not split evenly over "
                                f"{place.world_size} ranks", where="framework.batch_size",
                                hint="use a multiple of resources.slots_per_trial")
            from mlk_plugins.frameworks.jax._distributed import DataParallel

            self.parallel = DataParallel(place)
        self.data = self.ctx.load_data()
        self.meta = dict(self.data.meta)
        self.model = build_flax_model(self.ctx)
        self.params = init_params(self.model, self.ctx.seed, self.meta["input_shape"])
        self.tx = build_optimizer(self.config)
        self.opt_state = self.tx.init(self.params)
        augment = augment_settings(self.ctx, self.meta)
        # A worker keeps the compiled steps for its next request of the same model and optimiser.
        key = (self.model, self.config.model_dump_json(), json.dumps(augment, sort_keys=True))
        if key not in _STEPS:
            _STEPS.clear()
            _STEPS[key] = (jax.jit(train_step(self.model, self.tx, augment)), jax.jit(eval_step(self.model)))
        self._train_step, self._eval_step = _STEPS[key]

    def arrays(self, split: str) -> tuple[Any, Any]:
        """``(inputs, targets)`` of ``split`` on the device (once per trial)."""
        if split not in self._arrays:
            assert self.data is not None
            x, y = getattr(self.data, split)
            self._arrays[split] = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32))
        return self._arrays[split]

    # -- the loop -------------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> float:
        """One epoch shuffled by ``ctx.epoch_seed(epoch)``; returns the mean training loss."""
        self.epoch = epoch
        seed = self.ctx.epoch_seed(epoch)
        inputs, targets = self._train or self.arrays("train")
        n = int(targets.shape[0])
        order = np.random.default_rng(seed).permutation(n).astype(np.int32)
        losses, counts = [], []
        batches = padded_batches(order, self.config.batch_size, pad=self.parallel is not None)
        keys = step_keys(seed, len(batches))
        for step, (idx, mask) in enumerate(batches):
            counts.append(float(len(idx) if mask is None else mask.sum()))
            if self.parallel is not None:
                idx, mask = self.parallel.shard(idx), self.parallel.shard(mask)
            self.params, self.opt_state, loss = self._train_step(
                self.params, self.opt_state, inputs, targets, idx, mask, keys[step])
            losses.append(loss)
        if self.parallel is not None:
            self.parallel.check_identical(self.params, "parameters")
            losses = [self.parallel.local(loss) for loss in losses]
        # One transfer at the end: summing on the device would dispatch two eager ops per step.
        total = float(np.dot(np.asarray(jax.device_get(losses), np.float64), counts)) if losses else 0.0
        return total / n if n else float("nan")

    def local_params(self) -> Any:
        """The parameters as single-device arrays (this rank's replica when data-parallel)."""
        return self.params if self.parallel is None else self.parallel.local(self.params)

    def evaluate(self, split: str) -> dict[str, float]:
        """``<split>_loss`` and ``<split>_accuracy`` of the current parameters."""
        x, y = self.arrays(split)
        n = int(y.shape[0])
        loss, correct = 0.0, 0
        size = min(self.config.eval_batch_size, max(n, 1))
        for idx, mask in padded_batches(np.arange(n, dtype=np.int32), size, pad=False):
            batch_loss, batch_correct = self._eval_step(self.local_params(), x, y, idx, mask)
            loss += float(batch_loss)
            correct += int(batch_correct)
        if not n:
            return {f"{split}_loss": float("nan"), f"{split}_accuracy": float("nan")}
        return {f"{split}_loss": loss / n, f"{split}_accuracy": correct / n}

    def run(self) -> None:
        """Restore the latest checkpoint; then train and report each epoch to ``ctx.target``, checkpointing
        when ``ctx.checkpoint_due``."""
        ctx = self.ctx
        self.setup()
        start = self.restore()
        if self.parallel is not None:  # every rank restored the same checkpoint: share it
            self.params, self.opt_state = self.parallel.replicate((self.params, self.opt_state))
            self._train = self.parallel.replicate(self.arrays("train"))
        # Every rank evaluates the whole val split on its replica; only rank 0's reports are recorded.
        for epoch in range(start + 1, ctx.target + 1):
            metrics = {"train_loss": self.train_epoch(epoch), **self.evaluate("val")}
            ctx.report(epoch, metrics)
            stop, due = self.agree(ctx.should_stop(), ctx.checkpoint_due(epoch))
            if due or stop:
                with ctx.save_checkpoint(epoch, meta={"framework": "jax"}) as folder:
                    self.save(folder)
            if stop:
                break
        if self.parallel is not None:
            self.parallel.shutdown()

    def agree(self, *flags: bool) -> list[bool]:
        """``flags`` as every rank of a data-parallel trial sees them (each true when true on any rank)."""
        return self.parallel.any_rank_each(list(flags)) if self.parallel is not None else list(flags)

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Write parameters, optimiser state and trial info into ``folder``."""
        params, opt = flatten(self.local_params()), flatten(
            self.opt_state if self.parallel is None else self.parallel.local(self.opt_state))
        for name, leaves in ((PARAMS_FILE, params), (OPTIMIZER_FILE, opt)):
            arrays: dict[str, Any] = {f"v{i:03d}": a for i, (_, a) in enumerate(leaves)}
            np.savez(folder / name, **arrays)
        info = {"trial_id": self.ctx.trial_id, "epoch": self.epoch, "jax": jax.__version__,
                "params": [[p, list(a.shape)] for p, a in params], "optimizer": [[p, list(a.shape)] for p, a in opt]}
        (folder / INFO_FILE).write_text(json.dumps(info, sort_keys=True))

    def load(self, folder: Path) -> None:
        """Read what :meth:`save` wrote. A checkpoint of another trial (a child starting from its
        parent) gives its parameters and moments; the learning rate stays this trial's own (optax
        keeps it in the update function, not the state)."""
        self.params = load_params(self.params, folder, self.ctx.trial_id)
        if (folder / OPTIMIZER_FILE).is_file():
            self.opt_state = read_tree(self.opt_state, folder / OPTIMIZER_FILE, "optimizer")

    def restore(self) -> int:
        """Load the latest checkpoint if there is one; return its epoch (0 when starting fresh)."""
        with self.ctx.restore_checkpoint() as found:
            if found is None:
                return 0
            folder, resource = found
            self.load(folder)
        self.epoch = resource
        return resource


# -- pytrees without pickle -------------------------------------------------------------------------


def _path_name(path: Any) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def flatten(tree: Any) -> list[tuple[str, np.ndarray]]:
    """The leaves of ``tree`` in order, as ``(path, numpy array)``."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(_path_name(path), np.asarray(leaf)) for path, leaf in leaves]


def read_tree(like: Any, path: Path, what: str) -> Any:
    """The arrays saved by ``flatten`` order in ``path``, in the structure of ``like`` (same shapes)."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    with np.load(path, allow_pickle=False) as saved:
        if len(saved.files) != len(leaves):
            raise UserError(f"{path.name} holds {len(saved.files)} {what} arrays, the {what} has {len(leaves)}: "
                            "the checkpoint is of another architecture", where="model")
        values = []
        for i, leaf in enumerate(leaves):
            value = saved[f"v{i:03d}"]
            if tuple(value.shape) != tuple(np.shape(leaf)):
                raise UserError(f"{what} array {i} has shape {tuple(np.shape(leaf))}, the checkpoint "
                                f"{tuple(value.shape)}: the checkpoint is of another architecture", where="model")
            values.append(jnp.asarray(value, dtype=jnp.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, values)


def load_params(like: Any, folder: Path, trial_id: int) -> Any:
    """The parameters of the checkpoint (or artifact) in ``folder``, in the structure of ``like``."""
    if not (folder / PARAMS_FILE).is_file():
        raise UserError(f"checkpoint of trial {trial_id} has no {PARAMS_FILE}; it was not written by the jax "
                        "framework", where="framework.name")
    return read_tree(like, folder / PARAMS_FILE, "params")
