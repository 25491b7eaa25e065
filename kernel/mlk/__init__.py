"""mlk: a declarative ML lifecycle tool on a small plugin kernel.

``import mlk`` is cheap: names are loaded on first use. Plugin authors use ``mlk.hookimpl`` and
the base classes in ``mlk.searcher``, ``mlk.framework``, ``mlk.backend``, ``mlk.storage``,
``mlk.datasets`` and ``mlk.models``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "hookimpl": "mlk.hookspecs",
    "hookspec": "mlk.hookspecs",
    "TrialContext": "mlk.trial",
    "TrialRequest": "mlk.searcher",
    "UserError": "mlk.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlk' has no attribute '{name}'")
