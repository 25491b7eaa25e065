"""An ASGI middleware in front of every route: the optional bearer token and the request size limit.

Both are checked before the body is parsed or reaches the batcher. Health probes stay open (a load
balancer asks them without credentials); everything else, ``/metrics`` included, needs the token.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

#: Paths answered without a token.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/v2/health/live", "/v2/health/ready"})


async def _send_error(send: Any, status: int, message: str, extra: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _bundle_limit() -> int | None:
    """``max_request_bytes`` of the bundle served from a Bento (``MLK_SERVE_BUNDLE``), if any."""
    folder = os.environ.get("MLK_SERVE_BUNDLE")
    if not folder:
        return None
    try:
        with open(os.path.join(folder, "settings.json")) as f:
            return int(json.load(f)["max_request_bytes"])
    except (OSError, ValueError, KeyError):
        return None


class Guard:
    """Refuses requests without the bearer token (401) and bodies over the size limit (413).

    The token comes from ``MLK_SERVE_TOKEN`` and the limit from ``MLK_SERVE_MAX_BYTES`` (both set by
    ``mlk serve``), read when the app is built in the worker.
    """

    def __init__(self, app: Any, **_: Any) -> None:
        self.app = app
        token = os.environ.get("MLK_SERVE_TOKEN") or ""
        self.token = f"Bearer {token}".encode() if token else None
        self.max_bytes = int(os.environ.get("MLK_SERVE_MAX_BYTES") or _bundle_limit() or 4 << 20)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.token is not None and scope.get("path") not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.token):
                await _send_error(send, 401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                                  [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_error(send, 400, "Content-Length is not a number")
                return
            if declared > self.max_bytes:
                await _send_error(send, 413, f"the request body ({declared} bytes) is over the limit of "
                                             f"{self.max_bytes} bytes")
                return
            await self.app(scope, receive, send)
            return
        await self._counted(scope, receive, send)

    async def _counted(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A body without Content-Length (chunked): read it up to the limit, then replay it."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await _send_error(send, 413, f"the request body is over the limit of {self.max_bytes} bytes")
                return
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
