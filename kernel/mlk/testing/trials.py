"""Tiny trial functions (for the ``python`` framework) used by the conformance suites."""

from __future__ import annotations

import json
import os
import random
import time

from mlk.trial import TrialContext


def counter(ctx: TrialContext) -> None:
    """Loss = (x - 0.5)^2 + 1/epoch + a seeded jitter; checkpoints its epoch count when due."""
    x = float(ctx.hparams.get("x", 0.0))
    start = 0
    with ctx.restore_checkpoint() as restored:
        if restored is not None:
            folder, start = restored
            assert json.loads((folder / "state.json").read_text())["epoch"] == start
    for epoch in range(start + 1, ctx.target + 1):
        jitter = random.Random(ctx.epoch_seed(epoch)).random() * 1e-3
        ctx.report(epoch, {"loss": (x - 0.5) ** 2 + 1.0 / epoch + jitter})
        if ctx.checkpoint_due(epoch):
            with ctx.save_checkpoint(epoch) as folder:
                (folder / "state.json").write_text(json.dumps({"epoch": epoch}))


def die(ctx: TrialContext) -> None:
    """The worker process dies without a word, as under the OOM killer."""
    os._exit(9)


def counter_after_pause(ctx: TrialContext) -> None:
    """:func:`counter` after a 1 s pause: still running when a task submitted with it ends."""
    time.sleep(1.0)
    counter(ctx)


def preloaded(ctx: TrialContext) -> None:
    """Loss 0 when the module named by ``MLK_TEST_PRELOADED`` was imported before the trial began
    (by the backend's preload), 1 when not."""
    import sys

    ctx.report(1, {"loss": 0.0 if os.environ.get("MLK_TEST_PRELOADED", "") in sys.modules else 1.0})
