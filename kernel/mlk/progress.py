"""Live progress of a search: trials running and done, best so far, epochs spent and an ETA.

On a terminal it is a live line redrawn in place; otherwise (logs, CI) one line per finished
trial request, so nothing depends on a terminal.
"""

from __future__ import annotations

import time
from typing import Any


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class SearchProgress:
    """Progress of one search loop; a context manager around it."""

    def __init__(self, ctx: Any, searcher: Any, metric: str, mode: str) -> None:
        self.ctx = ctx
        self.searcher = searcher
        self.metric = metric
        self.sign = 1.0 if mode == "min" else -1.0
        self.started = time.time()
        self.done = 0
        self.failed = 0
        self.running = 0
        self.best: tuple[float, int] | None = None
        self.spent_at_start = self._spent()
        self.live: Any = None
        self.quiet = ctx.quiet

    def _spent(self) -> int:
        return sum(t["resource"] for t in self.ctx.store.trials(self.ctx.run_id))

    def __enter__(self) -> SearchProgress:
        from mlk.console import err_console

        console = err_console()
        if not self.quiet and console.is_terminal:
            from rich.live import Live

            self.live = Live(self._line(), console=console, refresh_per_second=4, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None
        if not self.quiet:
            self.ctx.say(self._line())

    def _line(self) -> str:
        spent = self._spent()
        budget = max(self.searcher.budget(), spent, 1)
        rate = (spent - self.spent_at_start) / max(time.time() - self.started, 1e-9)
        eta = _fmt_seconds((budget - spent) / rate) if rate > 0 else "?"
        best = f"best {self.metric}={self.best[0] * self.sign:.4g} (trial {self.best[1]})" if self.best else "best -"
        return (f"search: {self.done} done, {self.running} running, {self.failed} failed | {best} | "
                f"epochs {spent}/{budget} | elapsed {_fmt_seconds(time.time() - self.started)}, ETA {eta}")

    def refresh(self, running: int) -> None:
        self.running = running
        if self.live is not None:
            self.live.update(self._line())

    def note(self, message: str) -> None:
        if not self.quiet:
            if self.live is not None:
                self.live.console.print(message, highlight=False)
            else:
                self.ctx.say(message)

    def trial_done(self, trial_id: int, status: str, result: Any) -> None:
        self.done += status == "completed"
        if result.value is not None and result.value == result.value:
            score = self.sign * result.value
            if self.best is None or score < self.best[0]:
                self.best = (score, trial_id)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()))
        self.note(f"trial {trial_id} {status} at {result.resource} epochs ({result.seconds:.1f}s): {shown}")
        if self.live is None and not self.quiet:
            self.ctx.say(f"  {self._line()}")

    def trial_failed(self, trial_id: int, error: str) -> None:
        self.failed += 1
        last = [ln for ln in error.strip().splitlines() if ln.strip()]
        self.note(f"[red]trial {trial_id} failed[/]: {last[-1] if last else error}")
