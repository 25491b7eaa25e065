"""``random``: ``max_trials`` configurations sampled independently, each trained to ``max_resource``."""

from __future__ import annotations

from typing import Any

from mlk_plugins.searchers._full import FullTrainingSearcher


class RandomSearcher(FullTrainingSearcher):
    """Random search (Bergstra & Bengio, 2012). Samples come from the searcher's seeded RNG, so a
    seed gives the same configurations, and a resumed search continues the same sequence."""

    name = "random"

    def next_config(self) -> dict[str, Any] | None:
        return self.space.sample(self.rng)
