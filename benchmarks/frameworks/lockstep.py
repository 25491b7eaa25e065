"""Two training loops in one process taking turns epoch by epoch, so each mlk epoch is timed right
next to an epoch of the framework's own loop.

This machine's speed drifts by up to +-20 % over seconds to minutes (the same single-threaded matrix
product loop takes 0.12 to 0.16 s in one minute, with no steal time and nothing else running). Runs
alternated whole (mlk's 4 epochs, then the own loop's 4) still pair epochs tens of seconds apart;
in lockstep the two epochs of a pair are seconds apart, and every epoch of every repeat is a pair.

One side runs on the main thread and goes first, the other on a helper thread. mlk's trial hands
over from its ``mlk_trial_reported`` hook, the public hook every report fires; the own loop where it
stamps its epoch's end (a callback of ``fit`` / ``Trainer.fit``, or a line of the plain loop). Only
one side runs at a time, so the helper thread never competes for the CPU or the GIL. An epoch's
time is from the moment its side got the turn back to its next hand-over; the first epoch (set-up
and compilation) is left out of the medians.

The place is not neutral: with the plain torch loop on both sides (an A/A run, digits, 351 pairs)
the side on the main thread measured 1.8-3.0 % slower, pinned to one core or not. So the benchmark
swaps the sides' places every repeat (``mlk_first``) and the pairs of both halves are pooled.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

SIDES = ("mlk", "own")


class Lockstep:
    """The turn of two sides, ``mlk`` and ``own``, and the active seconds of each side's epochs."""

    def __init__(self) -> None:
        self._turn = {side: threading.Semaphore(0) for side in SIDES}
        self._lock = threading.Lock()
        self._done: set[str] = set()
        self._resumed: dict[str, float] = {}
        self.epochs: dict[str, list[float]] = {side: [] for side in SIDES}
        self.tail: dict[str, float] = {}

    @staticmethod
    def _other(side: str) -> str:
        return SIDES[1 - SIDES.index(side)]

    def begin(self, side: str, wait: bool) -> None:
        """``side`` starts: at once (``wait`` false, the side that goes first) or on its first turn."""
        if wait:
            self._turn[side].acquire()
        self._resumed[side] = time.perf_counter()

    def end_epoch(self, side: str) -> float:
        """``side`` finished an epoch: record it, give the other side its turn (unless it has finished)
        and wait for ours. Returns the wall-clock time of the epoch's end."""
        ended, now = time.time(), time.perf_counter()
        self.epochs[side].append(now - self._resumed[side])
        with self._lock:
            alone = self._other(side) in self._done
            if not alone:
                self._turn[self._other(side)].release()
        if not alone:
            self._turn[side].acquire()
        self._resumed[side] = time.perf_counter()
        return ended

    def finish(self, side: str) -> None:
        """``side`` is done (or failed): record its tail since its last epoch and let the other run on."""
        if side in self._resumed:
            self.tail[side] = time.perf_counter() - self._resumed[side]
        with self._lock:
            self._done.add(side)
            self._turn[self._other(side)].release()

    def times(self, side: str) -> dict[str, Any]:
        """``epoch_s`` (median over epochs 2..E), ``mean_epoch_s`` (epochs 2..E plus the tail after the
        last one: for mlk, the request's final checkpoint), ``tail_s`` and every epoch's seconds."""
        later = self.epochs[side][1:]
        tail = self.tail.get(side, 0.0)
        return {"epoch_s": statistics.median(later), "mean_epoch_s": (sum(later) + tail) / len(later),
                "tail_s": tail, "epochs_s": self.epochs[side]}


def run_pair(mlk: Callable[[Lockstep], dict[str, Any]], own: Callable[[Callable[[], float]], dict[str, Any]],
             mlk_first: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``mlk(turn)`` and ``own(stamp)`` in lockstep: the first side (mlk when ``mlk_first``) on
    this thread, the other on a helper thread. ``mlk`` calls ``turn.end_epoch("mlk")`` and ``own``
    calls ``stamp()`` at each epoch's end (both return the time of that end). Returns each side's
    result with its :meth:`Lockstep.times`; an exception on either side is raised here."""
    turn = Lockstep()
    calls: dict[str, Callable[[], dict[str, Any]]] = {
        "mlk": lambda: mlk(turn), "own": lambda: own(lambda: turn.end_epoch("own"))}
    first, second = ("mlk", "own") if mlk_first else ("own", "mlk")
    results: dict[str, Any] = {}

    def second_side() -> None:
        try:
            turn.begin(second, wait=True)
            results[second] = calls[second]()
        except BaseException as e:  # re-raised on the main thread
            results["error"] = e
        finally:
            turn.finish(second)

    helper = threading.Thread(target=second_side, name=f"lockstep-{second}", daemon=True)
    helper.start()
    turn.begin(first, wait=False)
    try:
        results[first] = calls[first]()
    finally:
        turn.finish(first)
        helper.join()
    if "error" in results:
        raise results["error"]
    return {**results["mlk"], **turn.times("mlk")}, {**results["own"], **turn.times("own")}


def paired_ratio(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> float:
    """The median over every epoch 2..E of every repeat of mlk's epoch / the own loop's epoch that
    followed it."""
    return statistics.median(m / o for mlk, own in pairs
                             for m, o in zip(mlk["epochs_s"][1:], own["epochs_s"][1:], strict=True))
