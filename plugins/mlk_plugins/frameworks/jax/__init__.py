"""``jax``: trains a Flax (linen) model with optax, jit-compiled steps and explicit PRNG keys.

This module stays light: JAX, Flax and optax load only when a trial trains or a model is exported
(``_impl``, ``artifacts``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from mlk.framework import Framework
from mlk.sections import FrameworkConfig

if TYPE_CHECKING:
    from pathlib import Path

    from mlk.compiler import Artifact, Runner
    from mlk.trial import TrialContext


class JaxConfig(FrameworkConfig):
    """``framework:`` for ``name: jax``. Values may be hyperparameters (``lr: ${hp.lr}``)."""

    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="the optimisation algorithm (optax)")
    lr: float = Field(1e-3, gt=0.0, description="learning rate")
    momentum: float = Field(0.0, ge=0.0, description="momentum (sgd only; adam and adamw ignore it)")
    weight_decay: float = Field(
        0.0, ge=0.0, description="L2 penalty added to the gradient (sgd, adam) or decoupled weight decay (adamw)"
    )
    batch_size: int = Field(32, ge=1, description="training examples per optimisation step")
    eval_batch_size: int = Field(512, ge=1, description="examples per forward pass when evaluating")
    loss: Literal["cross_entropy"] = Field("cross_entropy", description="the training and evaluation loss")


class JaxFramework(Framework):
    """Trains ``ctx``'s model (the spec's ``model:`` built for jax: a ``flax.linen.Module``) with optax.

    Parameters are initialised from a key of the trial's seed; each epoch's shuffle order comes
    from ``ctx.epoch_seed`` and each step's dropout and augmentation (``data.augment``: width/height
    shift, horizontal flip) from that epoch's key split into a key pair per step, so a resumed trial
    is bit-identical to an uninterrupted one. The train step (loss, gradients, optax update) and
    the evaluation step are ``jax.jit``-compiled. After each epoch it reports ``train_loss``,
    ``val_loss`` and ``val_accuracy`` and, when ``ctx.checkpoint_due``, checkpoints parameters
    and optimiser state as ``.npz`` + JSON through ``ctx.save_checkpoint`` (no pickle).

    With ``resources.slots_per_trial: N`` the trial runs on N processes joined by
    ``jax.distributed``: parameters replicated, each global batch split in N shards, gradients
    all-reduced by XLA (see :mod:`mlk_plugins.frameworks.jax._distributed`).

    Exports a ``jax`` artifact (parameters + how to rebuild the module); the ``jax_tflite``
    compiler turns it into TFLite through jax2tf, ``jax_onnx`` into ONNX.
    """

    name = "jax"
    Config: ClassVar[type[JaxConfig]] = JaxConfig
    requires = ("jax", "flax", "optax", "numpy")
    extra = "jax"
    export_format = "jax"
    #: ``resources.slots_per_trial`` up to this many rank processes (``jax.distributed``, gloo on CPU).
    max_slots = 64
    config: JaxConfig

    def train(self, ctx: TrialContext) -> None:
        from mlk_plugins.frameworks.jax._env import configure_threads

        configure_threads(ctx.threads)
        from mlk_plugins.frameworks.jax._impl import JaxTrial

        JaxTrial(ctx, self.config).run()

    def export(self, ctx: TrialContext, resource: int, out: Path) -> Artifact:
        """The model at the trial's checkpoint ``resource`` as a ``jax`` artifact."""
        from mlk_plugins.frameworks.jax.artifacts import export_trial

        return export_trial(ctx, self.config, resource, out)

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        from mlk_plugins.frameworks.jax._env import configure_threads

        configure_threads(threads)
        from mlk_plugins.frameworks.jax.artifacts import runner

        return runner(artifact)

    def determinism(self, deterministic: bool) -> dict[str, object]:
        from mlk_plugins.frameworks.jax._impl import determinism_flags

        return determinism_flags(deterministic)
