"""Latency of several runners on one input batch, interleaved so that background load hits them alike.

Every runner is first warmed up (``warmup`` untimed calls each, round-robin; at least two, and a
slow runner stops after two once its warm-up passed ``warmup_budget_s``). Then the timed calls
are spread over ``rounds`` rounds; in each round every variant, in a new random order (seeded), gets
its turn: a *settle* pause of ``settle_s`` seconds, untimed *switch* calls (at least one, for at least
``switch_s`` seconds), then its share of timed calls, back to back. The random order keeps any
effect of the variant that ran just before from always falling on the same variant (with a fixed
cyclic order, the torch pass after TVM was measured 2x slower than eager on the digits MLP at
batch 32, where a call takes 60 us and torch wakes a second OpenMP thread).

- The settle pause lets the previous runtime's idle threads stop spinning. Measured here on
  ResNet-18 at batch 1: after an ONNX Runtime call its worker thread keeps a core busy for about
  50 ms (libgomp's, after a torch call, about 10 ms), and a call of another runtime made in that
  time ran up to 2-3x slower (int8 2.2 -> 6 ms, fp32 7.5 -> 15 ms, eager 14 -> 36 ms). The pause
  busy-waits: sleeping was measured to be much worse on a loaded machine, where a thread that
  sleeps loses its core and the next call waits for the scheduler (digits MLP, batch 32: 40 ms
  instead of 50 us).
- The switch calls wake the variant's own threads and refill the caches with its data; they are
  skipped for calls estimated at over ``switch_below_s`` seconds, where both are small beside the call.

A variant whose calls are slow gets fewer timed calls, so that it takes about ``budget_s`` seconds
(never fewer than ``min_repeats``); the number is recorded with its statistics. Process CPU time
over wall time of the timed calls shows how many cores a runtime kept busy (spinning included; only
for calls of 20 ms or more), and
:class:`Contention` how many cores other processes of the machine kept busy meanwhile.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linear between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(samples_s: Sequence[float]) -> dict[str, Any]:
    """p50, p99, mean, min and max in milliseconds, and the samples (ms)."""
    ms = [s * 1000.0 for s in samples_s]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "mean_ms": sum(ms) / len(ms),
            "min_ms": min(ms), "max_ms": max(ms), "samples_ms": [round(v, 6) for v in ms]}


def _busy_wait(seconds: float) -> None:
    """Keep this thread on its core for ``seconds`` (a sleep would hand the core to other processes, and
    on a loaded machine the next call would then wait for the scheduler)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have been busy since boot (``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Contention:
    """How many cores *other* processes kept busy between :meth:`start` and :meth:`stop`: the machine's
    busy CPU time (``/proc/stat``) minus this process's own, over the wall time."""

    def start(self) -> Contention:
        self.wall, self.busy, self.own = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall
        busy = _busy_seconds()
        own = _own_seconds() - self.own
        other = None if busy is None or self.busy is None else max(0.0, (busy - self.busy - own) / wall)
        return {"wall_s": wall, "own_cores": own / wall, "other_cores": other}


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def wait_for_quiet(max_wait_s: float, below_cores: float = 0.5, window_s: float = 3.0) -> dict[str, Any]:
    """Wait (up to ``max_wait_s``) until other processes keep fewer than ``below_cores`` cores busy over a
    ``window_s`` window; return how long it waited and the last reading. It never stops anything."""
    start = time.perf_counter()
    reading = Contention().start()
    time.sleep(window_s)
    other = reading.stop()["other_cores"]
    while other is not None and other >= below_cores and time.perf_counter() - start + window_s <= max_wait_s:
        reading = Contention().start()
        time.sleep(window_s)
        other = reading.stop()["other_cores"]
    return {"waited_s": time.perf_counter() - start, "other_cores": other, "quiet": other is None or
            other < below_cores, "below_cores": below_cores, "max_wait_s": max_wait_s}


def measure(runners: dict[str, Callable[[Any], Any]], x: Any, *, repeats: int, warmup: int, rounds: int = 25,
            budget_s: float = 90.0, min_repeats: int = 10, switch_below_s: float = 0.25,
            warmup_budget_s: float = 10.0, settle_s: float = 0.1, switch_s: float = 0.01,
            seed: int = 0) -> dict[str, Any]:
    """Time ``runners`` (key -> callable on ``x``) interleaved; see the module docstring.

    Returns ``variants`` (key -> :func:`summary` plus ``cpu_per_wall`` and ``switch_call``),
    ``loadavg_before`` / ``loadavg_after`` (1, 5 and 15 minutes) and the settings used.
    """
    keys = list(runners)
    load_before = _loadavg()
    affinity = sorted(os.sched_getaffinity(0))
    contention = Contention().start()
    start = time.perf_counter()
    estimate: dict[str, float] = {k: math.inf for k in keys}
    warmed = dict.fromkeys(keys, 0)
    for i in range(max(2, warmup)):
        for k in keys:
            # slow runners stop warming after two calls once they have spent ``warmup_budget_s``
            if i >= 2 and (i >= warmup or estimate[k] * i > warmup_budget_s):
                continue
            t0 = time.perf_counter()
            runners[k](x)
            estimate[k] = min(estimate[k], time.perf_counter() - t0)
            warmed[k] += 1
    wanted = {k: max(min_repeats, min(repeats, int(budget_s / max(estimate[k], 1e-9)))) for k in keys}
    wanted = {k: min(repeats, n) for k, n in wanted.items()}
    rounds = max(1, min(rounds, max(wanted.values())))
    switch = {k: estimate[k] < switch_below_s for k in keys}
    samples: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, float] = dict.fromkeys(keys, 0.0)
    shuffle = random.Random(seed)
    for r in range(rounds):
        order = shuffle.sample(keys, len(keys))
        for k in order:
            share = math.ceil(wanted[k] * (r + 1) / rounds) - math.ceil(wanted[k] * r / rounds)
            if share <= 0:
                continue
            run = runners[k]
            _busy_wait(settle_s)
            if switch[k]:
                end = time.perf_counter() + switch_s
                run(x)
                while time.perf_counter() < end:
                    run(x)
            for _ in range(share):
                c0 = time.process_time()
                t0 = time.perf_counter()
                run(x)
                t1 = time.perf_counter()
                cpu[k] += time.process_time() - c0
                samples[k].append(t1 - t0)
    out: dict[str, Any] = {}
    for k in keys:
        wall = sum(samples[k])
        # other threads' CPU time is accounted at scheduler ticks: meaningless for calls under ~20 ms
        ratio = cpu[k] / wall if wall > 0 and wall / len(samples[k]) >= 0.02 else None
        out[k] = {**summary(samples[k]), "cpu_per_wall": ratio,
                  "switch_call": switch[k], "warmup_calls": warmed[k],
                  "fastest_warmup_ms": estimate[k] * 1000.0}
    return {"variants": out, "loadavg_before": load_before, "loadavg_after": _loadavg(),
            "contention": contention.stop(), "affinity": affinity,
            "seconds": time.perf_counter() - start,
            "settings": {"repeats": repeats, "warmup": warmup, "rounds": rounds, "budget_s": budget_s,
                         "min_repeats": min_repeats, "switch_below_s": switch_below_s,
                         "warmup_budget_s": warmup_budget_s, "settle_s": settle_s, "switch_s": switch_s,
                         "seed": seed}}
