"""The model contract (``mlk.models``): named architectures for one or more frameworks.

A model plugin builds its network for the framework that asks (``"torch"`` today; Lightning,
Keras and JAX later), from its validated options and the dataset's ``meta``. Heavy imports stay
inside :meth:`Model.build`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from mlk.errors import UserError
from mlk.plugin import Plugin


class ModelOptions(BaseModel):
    """Base of a model's ``Config``: the ``model:`` section minus ``name``; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Model(Plugin):
    """Base class of model plugins. ``frameworks`` lists the framework names :meth:`build` supports."""

    Config: ClassVar[type[BaseModel]] = ModelOptions
    frameworks: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: BaseModel) -> None:
        self.config = config

    def build(self, framework: str, meta: dict[str, Any]) -> Any:
        """The network for ``framework`` (e.g. a ``torch.nn.Module``), shaped by the dataset ``meta``."""
        raise NotImplementedError

    def unsupported(self, framework: str) -> UserError:
        return UserError(
            f"model '{self.name}' has no {framework} implementation",
            where="model.name", choices=self.frameworks, got=framework,
        )
