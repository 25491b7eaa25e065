"""Which version answers a request: loaded versions, the production/canary split, routing changes,
automatic rollback and drift monitoring.

The routes are one immutable :class:`Routes` object that a poller thread replaces (a single reference
assignment, so atomic for the event loop): a request takes the routes as they are when it arrives,
keeps its :class:`Version` until it is answered, and a rollback or promotion never drops it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlk_plugins.targets.server.bundle import Bundle
from mlk_plugins.targets.server.metrics import Metrics
from mlk_plugins.targets.server.signature import BadRequest

log = logging.getLogger("mlk.server")


class Overloaded(Exception):
    """The batcher could not answer within ``max_latency_ms`` (503)."""


class Outcomes:
    """The last ``size`` answers of a version (failed or not, latency): its error rate and p99."""

    def __init__(self, size: int = 1000) -> None:
        self._items: deque[tuple[bool, float]] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.total = 0
        self.failed = 0

    def record(self, ok: bool, seconds: float) -> None:
        with self._lock:
            self._items.append((ok, seconds))
            self.total += 1
            self.failed += not ok

    def reset(self) -> None:
        with self._lock:
            self._items.clear()

    def summary(self) -> dict[str, float]:
        """``requests`` (in the window), ``error_rate`` and ``p99_ms`` (0 when empty)."""
        with self._lock:
            items = list(self._items)
        if not items:
            return {"requests": 0.0, "error_rate": 0.0, "p99_ms": 0.0}
        latencies = sorted(s for _, s in items)
        p99 = latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]
        return {"requests": float(len(items)), "error_rate": sum(not ok for ok, _ in items) / len(items),
                "p99_ms": p99 * 1000.0}


class Version:
    """One loaded model version: its runner behind an adaptive batcher (or not), its drift window and
    its outcomes."""

    def __init__(self, model: str, version: str, bundle: Bundle, metrics: Metrics) -> None:
        from mlk.drift import DriftWindow

        self.model, self.version, self.bundle, self.metrics = model, version, bundle, metrics
        self.signature = bundle.signature
        self.settings = bundle.settings
        self.platform = f"mlk-{bundle.artifact.format}"
        self.runner = bundle.runner()
        # one model call at a time per version: the batcher sends one batch at a time anyway, and
        # runtimes such as TVM's VM are not safe to call from two threads
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"mlk-{model}-v{version}")
        self.window = DriftWindow(bundle.reference, size=self.settings.drift_window) if bundle.reference else None
        self.outcomes = Outcomes()
        self.alerting = False
        self._batched: Any = None
        if self.settings.batching and self.settings.max_batch_size > 1:
            self._batched = self._dispatcher()
        self.warm_up()

    def _dispatcher(self) -> Any:
        """BentoML's adaptive batcher (the CORK dispatcher its batchable APIs use) around this version's
        model call."""
        from bentoml._internal.marshal.dispatcher import CorkDispatcher

        def overloaded() -> Any:
            raise Overloaded(f"the server is overloaded: the request could not be answered within "
                             f"max_latency_ms={self.settings.max_latency_ms}")

        dispatcher = CorkDispatcher(max_latency_in_ms=self.settings.max_latency_ms,
                                    max_batch_size=self.settings.max_batch_size, fallback=overloaded,
                                    get_batch_size=len, batch_dim=(0, 0))
        return dispatcher(self._run_batches)

    async def _run_batches(self, batches: Any) -> list[Any]:
        import numpy as np

        sizes = [len(b) for b in batches]
        x = batches[0] if len(batches) == 1 else np.concatenate(batches)
        y = await asyncio.get_running_loop().run_in_executor(self.executor, self.run, x)
        return np.split(y, np.cumsum(sizes)[:-1])

    def run(self, x: Any) -> Any:
        """One model call (in the version's thread): outputs, batch-size metric, drift window."""
        y = self.runner(x)
        self.metrics.batch_size.labels(self.model, self.version).observe(len(x))
        self.metrics.examples.labels(self.model, self.version).inc(len(x))
        if self.window is not None:
            self.window.add(x, y)
        return y

    def warm_up(self) -> None:
        """One call before taking traffic (first calls of a runtime allocate and compile)."""
        import numpy as np

        self.runner(np.zeros([1, *self.signature.input_shape], dtype=self.signature.dtype))

    async def infer(self, x: Any) -> Any:
        if self._batched is not None:
            return await self._batched(x)
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.run, x)


@dataclass(frozen=True)
class Routes:
    """The serving versions at one moment. ``percent`` of requests go to ``canary``."""

    production: Version | None = None
    canary: Version | None = None
    percent: float = 0.0
    auto_rollback: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    def serving(self) -> list[tuple[str, Version]]:
        out = [("production", self.production)] if self.production else []
        return out + ([("canary", self.canary)] if self.canary else [])


class Router:
    """The routes of one model, kept in step with the registry (or one fixed bundle)."""

    def __init__(self, model: str, metrics: Metrics, *, home: Path | None = None, bundle: Path | None = None,
                 poll_interval: float = 0.5) -> None:
        self.model, self.metrics, self.home, self.bundle_path = model, metrics, home, bundle
        self.poll_interval = poll_interval
        self.routes = Routes()
        self.loaded: dict[str, Version] = {}
        self.error: str | None = None
        self._count = 0
        self._stop = threading.Event()
        self._judged: set[str] = set()
        self._last_monitor = time.monotonic()
        self._roles: list[Any] = []
        self._thread = threading.Thread(target=self._poll, name="mlk-routing", daemon=True)

    # -- requests ------------------------------------------------------------------------------------

    def ready(self) -> bool:
        return self.routes.production is not None

    def pick(self, version: str | None = None, request: bool = True) -> Version:
        """The version for one request: ``version`` when the client names one that is loaded, else the
        production/canary split (every request ``n`` goes to the canary when ``floor(n * p / 100)``
        steps, so the split is exact over any run of requests). ``request=False`` (metadata, readiness)
        answers production without counting towards the split."""
        routes = self.routes
        if version is not None:
            found = self.loaded.get(version)
            if found is None:
                names = ", ".join(v.version for _, v in routes.serving()) or "none"
                raise BadRequest(f"model {self.model!r} has no loaded version {version!r} (serving: {names})", 404)
            return found
        if routes.production is None:
            raise BadRequest(f"model {self.model!r} has no production version yet", 503)
        if routes.canary is None or not request:
            return routes.production
        self._count += 1
        n, p = self._count, routes.percent
        if math.floor(n * p / 100.0) > math.floor((n - 1) * p / 100.0):
            return routes.canary
        return routes.production

    # -- keeping in step ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        registry = None
        while not self._stop.is_set():
            try:
                if self.bundle_path is not None:
                    if self.routes.production is None:
                        self._install_bundle()
                else:
                    if registry is None:
                        from mlk.deployments import Registry

                        registry = Registry(self.home)
                    self._refresh(registry)
                    self._judge_canary(registry)
                self._monitor(registry)
                self.error = None
            except Exception as e:  # keep serving the routes we have; say why the update failed
                if str(e) != self.error:
                    log.error("mlk server: updating the routes of %s failed: %s: %s", self.model, type(e).__name__, e)
                self.error = str(e)
            self._stop.wait(self.poll_interval)

    def _install_bundle(self) -> None:
        assert self.bundle_path is not None
        version = Version(self.model, "bundle", Bundle.open(self.bundle_path, extra_files=True), self.metrics)
        self.loaded = {"bundle": version}
        self.routes = Routes(production=version, key="bundle")
        self._set_roles()
        log.info("mlk server: serving bundle %s as model %s", self.bundle_path, self.model)

    def _version(self, entry: Any) -> Version:
        key = str(entry.version)
        if key not in self.loaded:
            self.loaded = {**self.loaded, key: Version(self.model, key, Bundle.open(Path(entry.bundle)), self.metrics)}
        return self.loaded[key]

    def _refresh(self, registry: Any) -> None:
        routing = registry.routing(self.model)
        key = json.dumps([routing.production and routing.production.version, routing.canary and routing.canary.version,
                          routing.canary_percent, routing.auto_rollback], sort_keys=True)
        if key == self.routes.key:
            return
        production = self._version(routing.production) if routing.production else None
        canary = self._version(routing.canary) if routing.canary else None
        old = self.routes
        if canary is not None and canary is not old.canary:
            canary.outcomes.reset()  # judge a new canary on its own traffic only
            self._judged.discard(canary.version)
        self.routes = Routes(production, canary, routing.canary_percent if canary else 0.0,
                             dict(routing.auto_rollback or {}), key)
        self._set_roles()
        log.info("mlk server: %s routes: production %s, canary %s (%g%%)", self.model,
                 production.version if production else "none", canary.version if canary else "none",
                 self.routes.percent)

    def _set_roles(self) -> None:
        routes = self.routes
        roles = {}
        if routes.production:
            roles["production"] = (routes.production.version, 100.0 - routes.percent)
        if routes.canary:
            roles["canary"] = (routes.canary.version, routes.percent)
        self.metrics.set_roles(self.model, roles, self._roles)
        self._roles = [(self.model, version, role) for role, (version, _) in roles.items()]

    def _judge_canary(self, registry: Any) -> None:
        """Roll the canary back when its error rate or p99 passes the routing's ``auto_rollback``."""
        routes = self.routes
        rules, canary = routes.auto_rollback, routes.canary
        if canary is None or not rules or canary.version in self._judged:
            return
        seen = canary.outcomes.summary()
        if seen["requests"] < int(rules.get("min_requests") or 50):
            return
        reasons = []
        if rules.get("max_error_rate") is not None and seen["error_rate"] > float(rules["max_error_rate"]):
            reasons.append(f"error rate {seen['error_rate']:.1%} > {float(rules['max_error_rate']):.1%}")
        if rules.get("max_p99_ms") is not None and seen["p99_ms"] > float(rules["max_p99_ms"]):
            reasons.append(f"p99 {seen['p99_ms']:.1f} ms > {float(rules['max_p99_ms']):g} ms")
        if not reasons:
            return
        self._judged.add(canary.version)
        reason = (f"automatic rollback by the server: canary {canary.version} over {int(seen['requests'])} requests: "
                  + "; ".join(reasons))
        log.warning("mlk server: %s: %s", self.model, reason)
        registry.rollback(self.model, reason)
        self.metrics.rollbacks.labels(self.model).inc()
        self._refresh(registry)

    def _monitor(self, registry: Any) -> None:
        """Drift and traffic scores: into the gauges at every poll; into the registry, and an alert past
        the threshold, every ``monitor_interval_s``."""
        routes = self.routes
        if routes.production is None:
            return
        interval = routes.production.settings.monitor_interval_s
        due = time.monotonic() - self._last_monitor >= interval
        for _, version in routes.serving():
            scores = version.window.scores() if version.window is not None else {}
            if scores:
                self.metrics.set_drift(self.model, version.version, scores)
            if not due:
                continue
            self._alert(version, scores)
            traffic = version.outcomes.summary()
            if registry is not None and (scores or traffic["requests"]):
                registry.record_monitor(self.model, int(version.version), {**scores, **traffic})
        if due:
            self._last_monitor = time.monotonic()

    def _alert(self, version: Version, scores: dict[str, float]) -> None:
        from mlk.drift import worst

        threshold = version.settings.drift_threshold
        score = worst(scores)
        if score > threshold and not version.alerting:
            version.alerting = True
            log.warning("mlk server: DRIFT ALERT %s version %s: PSI %.3f > threshold %.3f (%s)", self.model,
                        version.version, score, threshold,
                        ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items())))
        elif score <= threshold and version.alerting:
            version.alerting = False
            log.warning("mlk server: drift back under the threshold for %s version %s: PSI %.3f", self.model,
                        version.version, score)

