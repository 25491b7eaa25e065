"""The BentoML service an mlk server runs (``bentoml serve mlk_plugins.targets.server.service:MlkServer``).

Routes:

- ``POST /predict`` (a BentoML API, so ``bentoml.SyncHTTPClient`` calls it as ``client.predict(...)``):
  ``{"inputs": [[...], ...], "version": optional}`` -> logits, predicted classes and their labels;
- the Open Inference Protocol v2 under ``/v2`` (JSON and the binary tensor extension);
- BentoML's ``/livez``, ``/readyz`` and ``/metrics`` (with mlk's per-version metrics appended).

What it serves comes from the environment ``mlk serve`` sets: ``MLK_HOME`` and ``MLK_SERVE_MODEL`` (a
registry model: production and canary, kept in step with the registry), or ``MLK_SERVE_BUNDLE`` (one
bundle folder, e.g. inside a Bento). ``MLK_SERVE_TOKEN`` turns on the bearer token.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from mlk_plugins.targets.server import v2 as protocol
from mlk_plugins.targets.server.guard import Guard
from mlk_plugins.targets.server.metrics import Metrics
from mlk_plugins.targets.server.routing import Overloaded, Router, Version
from mlk_plugins.targets.server.signature import BadRequest, from_json_list
from mlk_plugins.targets.server.timeout import install as install_timeout

install_timeout()

log = logging.getLogger("mlk.server")
if not log.handlers:  # BentoML sets up its own loggers; ours go to stderr in the worker
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

#: Seconds the service waits at start for its first version to load before it answers "not ready".
LOAD_TIMEOUT = 120.0


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Server:
    """The state of one server process: the router and the metrics, and the request path they share."""

    def __init__(self) -> None:
        self.model = os.environ.get("MLK_SERVE_MODEL") or "model"
        home, bundle = os.environ.get("MLK_HOME"), os.environ.get("MLK_SERVE_BUNDLE")
        self.metrics = Metrics()
        self.router = Router(self.model, self.metrics, home=Path(home) if home else None,
                             bundle=Path(bundle) if bundle else None,
                             poll_interval=float(os.environ.get("MLK_SERVE_POLL") or 0.5))
        self.router.start()
        deadline = time.monotonic() + LOAD_TIMEOUT
        while not self.router.ready() and time.monotonic() < deadline:
            time.sleep(0.05)

    async def answer(self, route: str, version: str | None, parse: Any, reply: Any) -> Response:
        """The shared request path: pick a version, check the input (4xx), run the model through the batcher,
        count it. ``parse(version)`` returns the parsed request; ``reply(version, request, logits)`` the
        response."""
        start = time.perf_counter()
        chosen: Version | None = None
        try:
            chosen = self.router.pick(version)
            request = parse(chosen)
        except BadRequest as e:
            label = chosen.version if chosen else "none"
            self.metrics.rejected.labels(self.model, _reason(str(e))).inc()
            self.metrics.requests.labels(self.model, label, route, str(e.status)).inc()
            return _error(e.status, str(e))
        try:
            logits = await chosen.infer(request.batch)
        except Overloaded as e:
            return self._failed(chosen, route, start, 503, str(e))
        except Exception as e:  # a fault of the model runtime: counted against this version
            log.exception("mlk server: inference failed on %s version %s", self.model, chosen.version)
            return self._failed(chosen, route, start, 500, f"inference failed: {type(e).__name__}")
        seconds = time.perf_counter() - start
        chosen.outcomes.record(True, seconds)
        self.metrics.latency.labels(self.model, chosen.version).observe(seconds)
        self.metrics.requests.labels(self.model, chosen.version, route, "200").inc()
        return reply(chosen, request, logits)

    def _failed(self, version: Version, route: str, start: float, status: int, message: str) -> Response:
        seconds = time.perf_counter() - start
        version.outcomes.record(False, seconds)
        self.metrics.errors.labels(self.model, version.version).inc()
        self.metrics.latency.labels(self.model, version.version).observe(seconds)
        self.metrics.requests.labels(self.model, version.version, route, str(status)).inc()
        return _error(status, message)

    def check_model(self, name: str) -> None:
        if name != self.model:
            raise BadRequest(f"unknown model {name!r}; this server serves {self.model!r}", 404)


def _reason(message: str) -> str:
    """A short label for the rejection metric (the message's first words)."""
    return " ".join(message.split()[:3]).strip(":;,")[:40]


STATE: Server | None = None


def settle_heap() -> None:
    """Move everything alive after start-up (BentoML, FastAPI, pydantic, OpenTelemetry, the runtime: ~100k
    objects) out of the garbage collector's reach with ``gc.freeze``.

    A full collection stops the event loop while it scans every tracked object; on this start-up heap alone
    that is ~30 ms. Under load such collections come every second or so (requests in flight survive into the
    oldest generation), so each would add its scan to every request in flight. Frozen, they scan only what
    requests created. Frozen objects are still freed by reference counting; only cycles among them are kept.
    See also :mod:`mlk_plugins.targets.server.timeout`, the larger half of the same p99 problem.
    """
    import gc

    gc.collect()
    gc.freeze()


def _state() -> Server:
    if STATE is None:
        raise BadRequest("the server is starting", 503)
    return STATE


class _Parsed:
    def __init__(self, batch: Any) -> None:
        self.batch = batch


# -- Open Inference Protocol v2 -------------------------------------------------------------------------

v2 = FastAPI(title="mlk Open Inference Protocol v2", openapi_url=None, docs_url=None, redoc_url=None)


@v2.exception_handler(BadRequest)
async def _bad_request(_: Request, e: BadRequest) -> JSONResponse:
    return _error(e.status, str(e))


@v2.get("/")
async def server_metadata() -> dict[str, Any]:
    from importlib.metadata import version

    return {"name": "mlk", "version": version("mlk-kernel"), "extensions": ["binary_tensor_data"]}


@v2.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@v2.get("/health/ready")
async def ready() -> Response:
    ok = STATE is not None and STATE.router.ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


def _metadata(name: str, version: str | None) -> dict[str, Any]:
    state = _state()
    state.check_model(name)
    chosen = state.router.pick(version, request=False)
    versions = [v.version for _, v in state.router.routes.serving()]
    return protocol.model_metadata(name, versions, chosen.platform, chosen.signature)


@v2.get("/models/{name}")
async def model_metadata(name: str) -> dict[str, Any]:
    return _metadata(name, None)


@v2.get("/models/{name}/versions/{version}")
async def version_metadata(name: str, version: str) -> dict[str, Any]:
    return _metadata(name, version)


def _model_ready(name: str, version: str | None) -> Response:
    state = _state()
    state.check_model(name)
    try:
        state.router.pick(version, request=False)
    except BadRequest as e:
        if e.status == 503:
            return JSONResponse({"name": name, "ready": False}, status_code=503)
        raise
    return JSONResponse({"name": name, "ready": True})


@v2.get("/models/{name}/ready")
async def model_ready(name: str) -> Response:
    return _model_ready(name, None)


@v2.get("/models/{name}/versions/{version}/ready")
async def version_ready(name: str, version: str) -> Response:
    return _model_ready(name, version)


async def _infer(name: str, version: str | None, request: Request) -> Response:
    state = _state()
    state.check_model(name)
    body = await request.body()
    header_length = request.headers.get(protocol.HEADER_LENGTH)

    def parse(chosen: Version) -> protocol.InferRequest:
        return protocol.parse_infer(body, header_length, chosen.signature)

    def reply(chosen: Version, parsed: protocol.InferRequest, logits: Any) -> Response:
        content, headers = protocol.infer_response(parsed, logits, name, chosen.version, chosen.signature)
        return Response(content, headers=headers, media_type=headers["content-type"])

    return await state.answer("v2", version, parse, reply)


@v2.post("/models/{name}/infer")
async def infer(name: str, request: Request) -> Response:
    return await _infer(name, None, request)


@v2.post("/models/{name}/versions/{version}/infer")
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(name, version, request)


# -- the BentoML service --------------------------------------------------------------------------------


@bentoml.asgi_app(v2, path="/v2")
@bentoml.service(name="mlk-server", workers=1, traffic={"timeout": 60})
class MlkServer:
    """An mlk model server: adaptive batching per version, v2 protocol, canary routing, drift."""

    def __init__(self) -> None:
        global STATE
        STATE = Server()
        settle_heap()

    def __is_ready__(self) -> bool:
        return STATE is not None and STATE.router.ready()

    def __metrics__(self, content: str) -> str:
        return content + (STATE.metrics.render() if STATE is not None else "")

    @bentoml.api(route="/predict")
    async def predict(self, inputs: Any = None, version: str | None = None) -> Any:
        """Logits, predicted class and its label for each example of ``inputs`` (nested lists, batch first)."""
        state = _state()

        def parse(chosen: Version) -> _Parsed:
            if inputs is None:
                raise BadRequest("the request needs 'inputs': a list of examples (nested lists of numbers)")
            return _Parsed(from_json_list(inputs, chosen.signature))

        def reply(chosen: Version, _: _Parsed, logits: Any) -> Response:
            classes = logits.argmax(axis=1).tolist()
            labels = chosen.signature.labels
            body = {"model": state.model, "version": chosen.version, "outputs": logits.tolist(),
                    "predictions": classes, "labels": [labels[c] if c < len(labels) else str(c) for c in classes]}
            return Response(json.dumps(body), media_type="application/json")

        return await state.answer("predict", version, parse, reply)


class V2Root:
    """``GET /v2`` (server metadata) is the root of the mounted v2 app, which only matches ``/v2/``."""

    def __init__(self, app: Any, **_: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == "/v2":
            scope = {**scope, "path": "/v2/", "raw_path": b"/v2/"}
        await self.app(scope, receive, send)


# the decorator returns a bentoml Service, which takes ASGI middlewares
MlkServer.add_asgi_middleware(V2Root)  # type: ignore[attr-defined]
MlkServer.add_asgi_middleware(Guard)  # type: ignore[attr-defined]
