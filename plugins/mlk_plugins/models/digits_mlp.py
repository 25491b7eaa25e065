"""``digits_mlp``: a one-hidden-layer perceptron, sized for flat inputs such as ``digits``."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from mlk.models import Model, ModelOptions


class DigitsMLPConfig(ModelOptions):
    """``model:`` options of ``name: digits_mlp``."""

    hidden: int = Field(64, ge=1, description="units in the hidden layer")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability after the hidden layer")


class DigitsMLP(Model):
    """Linear(inputs, hidden) - ReLU - Dropout - Linear(hidden, classes); inputs are flattened first."""

    name = "digits_mlp"
    Config: ClassVar[type[DigitsMLPConfig]] = DigitsMLPConfig
    frameworks = ("torch", "keras", "jax")
    requires = ("torch",)
    extra = "torch"
    config: DigitsMLPConfig

    def build(self, framework: str, meta: dict[str, Any]) -> Any:
        if framework == "keras":
            from mlk_plugins.models import _keras_nets

            return _keras_nets.mlp(meta, self.config.hidden, self.config.dropout)
        if framework == "jax":
            from mlk_plugins.models import _flax_nets

            return _flax_nets.mlp(meta, self.config.hidden, self.config.dropout)
        if framework != "torch":
            raise self.unsupported(framework)
        from mlk_plugins.models._torch_nets import mlp

        return mlp(meta, self.config.hidden, self.config.dropout)
