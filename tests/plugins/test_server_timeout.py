"""The server's replacement for BentoML's request timeout (plugins/mlk_plugins/targets/server/timeout.py)
and the start-up heap freeze: real ASGI calls through BentoML's middleware class on a real event loop."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import pytest

pytest.importorskip("bentoml")

from bentoml._internal.server.http.traffic import TimeoutMiddleware

from mlk_plugins.targets.server import timeout


async def answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await asyncio.sleep(5)
    await answer(scope, receive, send)


async def broken(scope: dict[str, Any], receive: Any, send: Any) -> None:
    raise RuntimeError("the app failed before answering")


def request(app: Any, seconds: float) -> tuple[list[dict[str, Any]], list[asyncio.TimerHandle], float]:
    """One HTTP request through BentoML's TimeoutMiddleware (with mlk's ``__call__``): the messages sent,
    the timers it scheduled, and how long it took."""
    sent: list[dict[str, Any]] = []
    timers: list[asyncio.TimerHandle] = []

    async def main() -> float:
        loop = asyncio.get_running_loop()
        schedule = loop.call_later

        def call_later(delay: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
            timers.append(schedule(delay, callback, *args, **kwargs))
            return timers[-1]

        loop.call_later = call_later  # type: ignore[method-assign]

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        started = loop.time()
        await TimeoutMiddleware(app, timeout=seconds)({"type": "http", "path": "/"}, receive, send)
        return loop.time() - started

    return sent, timers, asyncio.run(main())


@pytest.fixture(autouse=True)
def installed() -> Any:
    original = TimeoutMiddleware.__call__
    assert timeout.install()
    yield
    TimeoutMiddleware.__call__ = original  # type: ignore[method-assign]


def test_an_answered_request_leaves_no_timer_behind() -> None:
    sent, timers, _ = request(answer, 60)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == b"ok"
    assert len(timers) == 1 and timers[0].cancelled()  # BentoML's own stays scheduled for the 60 s


def test_a_request_past_the_timeout_is_answered_504() -> None:
    sent, timers, took = request(slow, 0.2)
    assert sent[0]["status"] == 504
    assert json.loads(sent[1]["body"]) == {"error": "Not able to process the request in 0.2 seconds"}
    assert took < 4 and timers[0].cancelled()  # answered at the timeout, not when the app got there (5 s)


def test_an_app_failing_before_it_answers_ends_the_request_at_once() -> None:
    import time

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="failed before answering"):
        request(broken, 30)
    assert time.monotonic() - started < 15  # BentoML's version waited the 30 s, then answered nothing


def test_other_scopes_pass_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    asyncio.run(timeout.call(TimeoutMiddleware(app, timeout=1), {"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]


def test_settle_heap_freezes_what_start_up_left() -> None:
    from mlk_plugins.targets.server.service import settle_heap

    try:
        settle_heap()
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
