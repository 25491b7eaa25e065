"""The hyperparameter search space: the ``hyperparameters:`` section of a spec.

Each entry is one of five types, tagged by ``type``::

    lr:         {type: log, minval: -4, maxval: -1, base: 10}   # 10**U(-4, -1)
    hidden:     {type: int, minval: 16, maxval: 256}             # uniform integer, both ends included
    dropout:    {type: double, minval: 0.0, maxval: 0.5}         # uniform float
    batch_size: {type: categorical, vals: [16, 32, 64]}
    momentum:   {type: const, val: 0.9}                          # or simply `momentum: 0.9`

``count`` on int/double/log sets how many points grid search takes along that axis. Log bounds
are exponents of ``base``, so the search works on the log scale.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator


class _HP(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Const(_HP):
    """A fixed value, still recorded with every trial."""

    type: Literal["const"]
    val: Any = Field(description="the value")

    def sample(self, rng: random.Random) -> Any:
        return self.val

    def grid(self) -> list[Any]:
        return [self.val]

    def probe(self) -> Any:
        return self.val

    def center(self) -> Any:
        return self.val


class _Range(_HP):
    minval: float = Field(description="low end (an exponent of base for log)")
    maxval: float = Field(description="high end, above minval (an exponent of base for log)")
    count: int | None = Field(None, ge=1, description="grid points along this axis (grid search)")

    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        if not self.minval < self.maxval:
            raise ValueError(f"minval ({self.minval}) must be below maxval ({self.maxval})")
        return self

    def _grid_fractions(self) -> list[float]:
        if self.count is None:
            raise ValueError("grid search needs `count` on every int, double and log hyperparameter")
        if self.count == 1:
            return [0.5]
        return [i / (self.count - 1) for i in range(self.count)]


class Int(_Range):
    """A uniform integer in [minval, maxval], both included."""

    type: Literal["int"]
    minval: int = Field(description="low end, included")  # type: ignore[assignment]
    maxval: int = Field(description="high end, included")  # type: ignore[assignment]

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.minval, self.maxval)

    def grid(self) -> list[int]:
        span = self.maxval - self.minval
        return sorted({self.minval + round(f * span) for f in self._grid_fractions()})

    def probe(self) -> int:
        return self.minval

    def center(self) -> int:
        return (self.minval + self.maxval) // 2


class Double(_Range):
    """A uniform float in [minval, maxval]."""

    type: Literal["double"]

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.minval, self.maxval)

    def grid(self) -> list[float]:
        return [self.minval + f * (self.maxval - self.minval) for f in self._grid_fractions()]

    def probe(self) -> float:
        return float(self.minval)

    def center(self) -> float:
        return (self.minval + self.maxval) / 2


class Log(_Range):
    """``base ** U(minval, maxval)``: minval and maxval are exponents."""

    type: Literal["log"]
    base: float = Field(10.0, gt=1.0, description="the base of the exponents")

    def sample(self, rng: random.Random) -> float:
        return float(self.base ** rng.uniform(self.minval, self.maxval))

    def grid(self) -> list[float]:
        return [float(self.base ** (self.minval + f * (self.maxval - self.minval))) for f in self._grid_fractions()]

    def probe(self) -> float:
        return float(self.base**self.minval)

    def center(self) -> float:
        return float(self.base ** ((self.minval + self.maxval) / 2))


class Categorical(_HP):
    """One of ``vals``, uniformly."""

    type: Literal["categorical"]
    vals: list[Any] = Field(min_length=1, description="the choices")

    def sample(self, rng: random.Random) -> Any:
        return rng.choice(self.vals)

    def grid(self) -> list[Any]:
        return list(self.vals)

    def probe(self) -> Any:
        return self.vals[0]

    def center(self) -> Any:
        return self.vals[0]


Hyperparameter = Annotated[Const | Int | Double | Log | Categorical, Field(discriminator="type")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Hyperparameter)


def parse_hyperparameter(raw: Any) -> Const | Int | Double | Log | Categorical:
    """A mapping with ``type`` becomes that type; anything else is shorthand for ``const``."""
    if isinstance(raw, dict) and "type" in raw:
        return _ADAPTER.validate_python(raw)  # type: ignore[no-any-return]
    return Const(type="const", val=raw)


class SearchSpace:
    """The validated ``hyperparameters:`` section, in spec order."""

    def __init__(self, params: dict[str, Const | Int | Double | Log | Categorical]) -> None:
        self.params = dict(params)

    def names(self) -> list[str]:
        return list(self.params)

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """One random configuration; consumes ``rng`` in a fixed order, so a seed reproduces it."""
        return {name: hp.sample(rng) for name, hp in self.params.items()}

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of each hyperparameter's grid points, in spec order."""
        axes = [hp.grid() for hp in self.params.values()]
        return [dict(zip(self.params, combo)) for combo in itertools.product(*axes)]

    def probe(self) -> dict[str, Any]:
        """One valid configuration (the low end of each range), used to check a spec before running."""
        return {name: hp.probe() for name, hp in self.params.items()}

    def center(self) -> dict[str, Any]:
        """The middle of each range (log ranges on the log scale), the first of each categorical."""
        return {name: hp.center() for name, hp in self.params.items()}

    def grid_size(self) -> int:
        return math.prod(len(hp.grid()) for hp in self.params.values())

    def dump(self) -> dict[str, Any]:
        return {name: hp.model_dump() for name, hp in self.params.items()}
