"""A request timeout whose timer ends with the request, in place of the one BentoML 1.4 installs.

BentoML wraps every service in its ``TimeoutMiddleware`` (``traffic.timeout``, 60 s by default, and it
cannot be switched off). Its timer is never cancelled: each answered request leaves a scheduled callback
for the rest of the timeout, and that callback holds the request's context (its OpenTelemetry span,
with its lists and locks). At 700 requests per second that is ~1M objects alive at any time, so the
garbage collector's full passes grow to 100-200 ms, run about once a second under load, and stop the
event loop while they run (measured in a BentoML worker at concurrency 32: every request in flight
waited ~160 ms, which set the p99).

:func:`install` replaces that middleware's ``__call__`` with :func:`call`, which behaves the same (504
with the same message when the app has not started answering within the timeout) and cancels its timer
as soon as the request is done. An app that fails before it answers ends the request at once, where
BentoML's waited for the timeout. If BentoML's class is not where this module expects it, nothing is
replaced and the server runs with BentoML's own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("mlk.server")


async def call(self: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``TimeoutMiddleware.__call__`` with its timer cancelled when the request ends."""
    if scope["type"] not in ("http", "websocket"):
        await self.app(scope, receive, send)
        return
    loop = asyncio.get_running_loop()
    started = loop.create_future()  # done when the app sends its first message, or on timeout

    def expire() -> None:
        if not started.done():
            started.set_exception(asyncio.TimeoutError())

    async def send_started(message: Any) -> None:
        if not started.done():
            started.set_result(None)
        await send(message)

    timer = loop.call_later(self.timeout, expire)
    task = asyncio.ensure_future(self.app(scope, receive, send_started))
    try:
        await asyncio.wait((started, task), return_when=asyncio.FIRST_COMPLETED)
        timed_out = started.done() and started.exception() is not None
        if timed_out and task.cancel():
            from starlette.responses import JSONResponse

            message = f"Not able to process the request in {self.timeout} seconds"
            await JSONResponse({"error": message}, status_code=504)(scope, receive, send)
            return
        await task  # its answer is under way (or it failed before answering: its error goes up)
    finally:
        timer.cancel()


def install() -> bool:
    """Put :func:`call` in place of BentoML's ``TimeoutMiddleware.__call__``; whether it was replaced."""
    try:
        from bentoml._internal.server.http.traffic import TimeoutMiddleware
    except ImportError:
        log.warning("mlk server: BentoML's TimeoutMiddleware was not found; its timers stay as they are")
        return False
    if not callable(getattr(TimeoutMiddleware, "_set_timer_out", None)):
        log.warning("mlk server: BentoML's TimeoutMiddleware has changed; its timers stay as they are")
        return False
    TimeoutMiddleware.__call__ = call  # type: ignore[method-assign]
    return True
