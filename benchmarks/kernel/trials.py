"""Trial functions for the benchmarks: no framework, so only the kernel's own cost is measured."""

from __future__ import annotations

from mlk.trial import TrialContext


def noop(ctx: TrialContext) -> None:
    """Report the searcher metric once at the target resource and return."""
    ctx.report(ctx.target, {"loss": float(ctx.hparams.get("x", 0.0))})
