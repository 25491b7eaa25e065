"""XLA's CPU thread settings, which must be in the environment before JAX starts its backend."""

from __future__ import annotations

import os
import sys

#: The flags :func:`configure_threads` adds for one thread.
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def configure_threads(threads: int) -> None:
    """Keep XLA on one CPU thread when the trial may use only one, if JAX's backend has not started
    yet in this process (a worker's later trials keep what its first one set)."""
    if threads > 1 or "--xla_cpu_multi_thread_eigen" in os.environ.get("XLA_FLAGS", ""):
        return
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD}".strip()
