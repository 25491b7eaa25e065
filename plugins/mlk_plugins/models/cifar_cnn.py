"""``cifar_cnn``: the small CIFAR-10 convolutional network of the seed talk."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from mlk.errors import UserError
from mlk.models import Model, ModelOptions


class CifarCNNConfig(ModelOptions):
    """``model:`` options of ``name: cifar_cnn``."""

    dropout1: float = Field(0.25, ge=0.0, lt=1.0, description="dropout after the first conv block (32 ch)")
    dropout2: float = Field(0.25, ge=0.0, lt=1.0, description="dropout after the second conv block (64 ch)")
    dropout3: float = Field(0.5, ge=0.0, lt=1.0, description="dropout after the 512-unit dense layer")


class CifarCNN(Model):
    """Two blocks of two 3x3 convolutions (32, then 64 channels, padding 1, ReLU) each followed by
    2x2 max-pooling and dropout; then dense 512 - ReLU - dropout - dense classes.

    Takes ``nchw`` images; the input shape comes from the dataset's ``meta``.
    """

    name = "cifar_cnn"
    Config: ClassVar[type[CifarCNNConfig]] = CifarCNNConfig
    frameworks = ("torch", "keras", "jax")
    requires = ("torch",)
    extra = "torch"
    config: CifarCNNConfig

    def build(self, framework: str, meta: dict[str, Any]) -> Any:
        if framework not in self.frameworks:
            raise self.unsupported(framework)
        shape = list(meta.get("input_shape", []))
        if meta.get("layout") != "nchw" or len(shape) != 3 or min(shape[1:]) < 4:
            raise UserError(
                f"model '{self.name}' needs images of at least 4x4 pixels (layout nchw, input_shape "
                f"[channels, height, width]); the dataset gives layout {meta.get('layout')!r}, "
                f"input_shape {shape}",
                where="model.name", hint="use a model for flat inputs, e.g. digits_mlp",
            )
        c = self.config
        if framework == "keras":
            from mlk_plugins.models import _keras_nets

            return _keras_nets.cifar_cnn(meta, c.dropout1, c.dropout2, c.dropout3)
        if framework == "jax":
            from mlk_plugins.models import _flax_nets

            return _flax_nets.cifar_cnn(meta, c.dropout1, c.dropout2, c.dropout3)
        from mlk_plugins.models._torch_nets import cifar_cnn

        return cifar_cnn(meta, self.config.dropout1, self.config.dropout2, self.config.dropout3)
