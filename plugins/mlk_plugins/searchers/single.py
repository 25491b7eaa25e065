"""``single``: train one configuration (each range's centre, each categorical's first value)."""

from __future__ import annotations

from typing import Any

from mlk_plugins.searchers._full import FullTrainingSearcher


class SingleSearcher(FullTrainingSearcher):
    """One trial to ``max_resource`` epochs; ``max_trials`` is ignored."""

    name = "single"

    def total(self) -> int:
        return 1

    def next_config(self) -> dict[str, Any] | None:
        return self.space.center()
