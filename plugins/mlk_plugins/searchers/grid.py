"""``grid``: every combination of each hyperparameter's grid points (``count`` per range)."""

from __future__ import annotations

from typing import Any

from mlk.errors import UserError
from mlk.hyperparameters import SearchSpace
from mlk.sections import SearcherConfig
from mlk_plugins.searchers._full import FullTrainingSearcher


class GridSearcher(FullTrainingSearcher):
    """Exhaustive grid search in spec order; ``max_trials`` must cover the grid."""

    name = "grid"

    @classmethod
    def check_space(cls, config: SearcherConfig, space: SearchSpace) -> None:
        try:
            size = space.grid_size()
        except ValueError as e:
            missing = [n for n, hp in space.params.items() if hp.type in ("int", "double", "log")
                       and getattr(hp, "count", None) is None]
            raise UserError(str(e), where=f"hyperparameters.{missing[0]}.count" if missing else "hyperparameters",
                            hint="e.g. lr: {type: log, minval: -4, maxval: -1, count: 4}") from None
        if size > config.max_trials:
            raise UserError(f"the grid has {size} points but max_trials is {config.max_trials}",
                            where="searcher.max_trials", hint=f"set searcher.max_trials={size} or lower the counts")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.points = self.space.grid()

    def total(self) -> int:
        return min(self.config.max_trials, len(self.points))

    def next_config(self) -> dict[str, Any] | None:
        return self.points[self.issued] if self.issued < len(self.points) else None
