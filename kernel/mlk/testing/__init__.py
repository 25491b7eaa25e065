"""Conformance suites a plugin's tests subclass in one line, builtin and third-party alike::

    from mlk.testing.searcher import SearcherContract

    class TestMySearcher(SearcherContract):
        plugin = "my_searcher"          # its entry-point name

Each suite checks the contract of its plugin group against the real kernel: registration,
configuration, behaviour, resumability. Requires pytest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_spec(sections: dict[str, Any], home: Path) -> Any:
    """A validated :class:`mlk.spec.Spec` from ``sections`` (defaults fill the rest)."""
    from mlk.spec import validate_spec

    raw: dict[str, Any] = {
        "seed": 0,
        "framework": {"name": "python", "function": "mlk.testing.trials:counter"},
        "data": {"name": "digits"},
        "model": {"name": "digits_mlp"},
        "hyperparameters": {"x": {"type": "double", "minval": 0.0, "maxval": 1.0}},
        "searcher": {"name": "random", "metric": "loss", "max_trials": 2, "max_resource": 2},
        "storage": {"name": "local", "path": str(home / "store")},
    }
    raw.update(sections)
    return validate_spec(raw, home / "contract.yaml")
