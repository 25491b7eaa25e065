"""Where mlk writes for people: results to stdout, progress and messages to stderr.

Off a terminal (pipes, logs, CI) lines are not wrapped and tables get a wide page.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Any


def _console(stderr: bool) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, soft_wrap=True, width=width)


@lru_cache(maxsize=1)
def err_console() -> Any:
    return _console(stderr=True)


@lru_cache(maxsize=1)
def out_console() -> Any:
    return _console(stderr=False)
