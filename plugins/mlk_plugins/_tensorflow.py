"""Importing TensorFlow without the C++ start-up lines it writes straight to file descriptor 2.

TensorFlow 2.21 logs "oneDNN custom operations are on" through absl before ``TF_CPP_MIN_LOG_LEVEL``
is read, on every process that imports it (each validation subprocess, each worker), burying
mlk's own output. :func:`import_tensorflow` points descriptor 2 at a temporary file while the
import runs, then writes back whatever else arrived there (another thread's output); when the
import fails, everything captured is written back, so the cause is never hidden.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

#: Lines TensorFlow writes on import that say nothing to an mlk user.
NOISE = ("absl::InitializeLog()", "oneDNN custom operations are on")


def import_tensorflow() -> Any:
    """``import tensorflow`` with its start-up noise dropped; ``TF_CPP_MIN_LOG_LEVEL`` defaults to 2."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            import tensorflow as tf

            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines = log.read().decode(errors="replace").splitlines(keepends=True)
            kept = lines if failed else [line for line in lines if not any(n in line for n in NOISE)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
    return tf
