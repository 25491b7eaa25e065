"""``keras``: trains a Keras 3 model (TensorFlow backend) with ``fit``, checkpoints through mlk's storage.

This module stays light: TensorFlow (~7 s to import) loads only when a trial trains or a model is
exported (``_impl``, ``artifacts``).
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


class KerasConfig(FrameworkConfig):
    """``framework:`` for ``name: keras``. Values may be hyperparameters (``lr: ${hp.lr}``)."""

    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="the optimisation algorithm")
    lr: float = Field(1e-3, gt=0.0, description="learning rate")
    momentum: float = Field(0.0, ge=0.0, description="momentum (sgd only; adam and adamw ignore it)")
    weight_decay: float = Field(
        0.0, ge=0.0, description="decoupled weight decay (Keras's `weight_decay`, for every optimizer)"
    )
    batch_size: int = Field(32, ge=1, description="training examples per optimisation step")
    eval_batch_size: int = Field(512, ge=1, description="examples per forward pass when evaluating")
    loss: Literal["cross_entropy"] = Field("cross_entropy", description="the training and evaluation loss")
    jit_compile: bool = Field(False, description="compile the train and evaluation steps with XLA")


class KerasFramework(Framework):
    """Trains ``ctx``'s model (the spec's ``model:`` built for keras) with one ``model.fit`` call.

    Input is a ``tf.data`` pipeline: each epoch's shuffle order comes from ``ctx.epoch_seed`` and
    its augmentation (``data.augment``: width/height shift, horizontal flip) from stateless random
    ops keyed by that seed and the batch index; dropout is reseeded from it when the epoch begins.
    A callback reports ``train_loss``, ``val_loss`` and ``val_accuracy`` after each epoch and, when
    ``ctx.checkpoint_due``, saves weights and optimiser variables as ``.npz`` + JSON through
    ``ctx.save_checkpoint`` (no pickle).
    With ``reproducibility.deterministic`` TensorFlow's op determinism is on, and a resumed trial
    is bit-identical to an uninterrupted one.

    With ``resources.slots_per_trial: N`` the trial runs on N processes joined by TensorFlow's
    ``MultiWorkerMirroredStrategy`` (``TF_CONFIG`` from ``ctx.distributed.worker_ports``, ring
    all-reduce on CPU): weights and optimiser replicated, each global batch of ``batch_size`` split
    in N shards, gradients summed over ranks (see :mod:`mlk_plugins.frameworks.keras._distributed`).
    The checkpoint format is the same, so a trial resumes on any number of processes.

    Exports a ``keras`` artifact (a ``.keras`` file); the ``keras_onnx`` and ``keras_tflite``
    compilers turn it into ONNX (and from there ONNX Runtime, TVM, TFLite through onnx2tf) and into
    TFLite natively.
    """

    name = "keras"
    Config: ClassVar[type[KerasConfig]] = KerasConfig
    requires = ("tensorflow", "keras", "numpy")
    extra = "keras"
    export_format = "keras"
    #: ``resources.slots_per_trial`` up to this many rank processes (``MultiWorkerMirroredStrategy``).
    max_slots = 64
    config: KerasConfig

    def train(self, ctx: TrialContext) -> None:
        from mlk_plugins.frameworks.keras._impl import KerasTrial

        KerasTrial(ctx, self.config).run()

    def export(self, ctx: TrialContext, resource: int, out: Path) -> Artifact:
        """The model at the trial's checkpoint ``resource`` as a ``keras`` artifact."""
        from mlk_plugins.frameworks.keras.artifacts import export_trial

        return export_trial(ctx, self.config, resource, out)

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        from mlk_plugins.frameworks.keras.artifacts import runner

        return runner(artifact, threads)

    def determinism(self, deterministic: bool) -> dict[str, object]:
        from mlk_plugins.frameworks.keras._impl import set_determinism

        return set_determinism(deterministic)
