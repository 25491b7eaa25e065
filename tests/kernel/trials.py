"""Trial functions for the `python` framework, used by the kernel tests: real processes, real
checkpoints, no ML framework, so kernel behaviour is tested in seconds."""

from __future__ import annotations

import json
import os
import random
import time

from mlk.trial import TrialContext


def quadratic(ctx: TrialContext) -> None:
    """Loss (x - 0.3)^2 + decay/epoch + seeded noise; state checkpointed as JSON each epoch."""
    x = float(ctx.hparams["x"])
    start, acc = 0, 0.0
    with ctx.restore_checkpoint() as restored:
        if restored is not None:
            folder, start = restored
            acc = json.loads((folder / "state.json").read_text())["acc"]
    delay = float(os.environ.get("MLK_TEST_EPOCH_SECONDS", "0"))
    for epoch in range(start + 1, ctx.target + 1):
        rng = random.Random(ctx.epoch_seed(epoch))
        acc += rng.random()
        if delay:
            time.sleep(delay)
        loss = (x - 0.3) ** 2 + 1.0 / epoch + 0.001 * acc
        ctx.report(epoch, {"loss": loss, "acc_sum": acc})
        with ctx.save_checkpoint(epoch) as folder:
            (folder / "state.json").write_text(json.dumps({"acc": acc, "epoch": epoch}))
        if ctx.should_stop():
            return


def noop(ctx: TrialContext) -> None:
    """Reports once and returns: measures the kernel's per-trial overhead."""
    ctx.report(ctx.target, {"loss": float(ctx.hparams.get("x", 0.0))})


def crash(ctx: TrialContext) -> None:
    raise RuntimeError("this trial always crashes")


def crash_once(ctx: TrialContext) -> None:
    """Dies hard (os._exit) the first time trial 2 reaches epoch 2, then behaves."""
    marker = ctx.store.home / f"crashed-{ctx.trial_id}"
    if ctx.trial_id == 2 and not marker.exists():
        ctx.target = 1  # train one epoch (checkpointed), then die as a killed worker would
        quadratic(ctx)
        marker.write_text("x")
        os._exit(13)
    quadratic(ctx)
