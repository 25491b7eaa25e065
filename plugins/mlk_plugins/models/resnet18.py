"""``resnet18``: the 18-layer residual network of He et al. (2016), for image classification."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from mlk.errors import UserError
from mlk.models import Model, ModelOptions


class ResNet18Config(ModelOptions):
    """``model:`` options of ``name: resnet18``."""

    width: int = Field(
        64, ge=1,
        description="channels of the first stage; the later stages have 2x, 4x and 8x as many (64: the standard "
        "ResNet-18)",
    )
    small_input: bool = Field(
        True,
        description="CIFAR-style stem for small images (3x3 convolution, stride 1, no max-pooling); false: the "
        "ImageNet stem (7x7 convolution with stride 2, then 3x3 max-pooling with stride 2)",
    )


class ResNet18(Model):
    """ResNet-18: a stem, four stages of two basic residual blocks (two 3x3 convolutions with batch
    norm; a 1x1 projection shortcut where the shape changes) at ``width``, 2, 4 and 8 times
    ``width`` channels, global average pooling and a linear classifier.

    Takes ``nchw`` images; input channels and classes come from the dataset's ``meta``. With
    ``width: 64`` and 10 classes it has about 11.17 million parameters.
    """

    name = "resnet18"
    Config: ClassVar[type[ResNet18Config]] = ResNet18Config
    frameworks = ("torch",)
    requires = ("torch",)
    extra = "torch"
    config: ResNet18Config

    def build(self, framework: str, meta: dict[str, Any]) -> Any:
        if framework != "torch":
            raise self.unsupported(framework)
        shape = list(meta.get("input_shape", []))
        if meta.get("layout") != "nchw" or len(shape) != 3 or min(int(d) for d in shape) < 1:
            raise UserError(
                f"model '{self.name}' needs images (layout nchw, input_shape [channels, height, width]); "
                f"the dataset gives layout {meta.get('layout')!r}, input_shape {shape}",
                where="model.name", hint="use a model for flat inputs, e.g. digits_mlp",
            )
        from mlk_plugins.models._resnet import resnet18

        return resnet18(shape, int(meta["num_classes"]), self.config.width, self.config.small_input)
