"""Prometheus metrics of an mlk server, per model version, appended to BentoML's own ``/metrics``.

They live in a registry of their own (not prometheus_client's global one), so several servers in one
process, or BentoML's multiprocess collector, never mix them up.
"""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters, histograms and gauges of one server process."""

    def __init__(self, max_batch_size: int = 64) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "version")
        self.requests = Counter("mlk_requests", "Inference requests answered, by route and HTTP status",
                                (*labels, "route", "code"), registry=self.registry)
        self.errors = Counter("mlk_errors", "Inference requests that failed on the server side (5xx)",
                              labels, registry=self.registry)
        self.rejected = Counter("mlk_rejected", "Requests refused before inference (4xx), by reason",
                                ("model", "reason"), registry=self.registry)
        self.latency = Histogram("mlk_request_latency_seconds", "Time from request to answer, in the server",
                                 labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch_size})
        self.batch_size = Histogram("mlk_batch_size", "Examples per model call (adaptive batching)",
                                    labels, buckets=buckets, registry=self.registry)
        self.examples = Counter("mlk_examples", "Examples run through the model", labels, registry=self.registry)
        self.drift = Gauge("mlk_drift_score", "Drift of the live inputs and predictions from the training data",
                           (*labels, "score"), registry=self.registry)
        self.traffic_share = Gauge("mlk_traffic_percent", "Share of traffic each serving version takes",
                                   (*labels, "role"), registry=self.registry)
        self.rollbacks = Counter("mlk_auto_rollbacks", "Canaries rolled back by this server", ("model",),
                                 registry=self.registry)

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def set_drift(self, model: str, version: str, scores: dict[str, float]) -> None:
        for name, value in scores.items():
            self.drift.labels(model, version, name).set(value)

    def set_roles(self, model: str, roles: dict[str, tuple[str, float]], old: list[Any]) -> None:
        """``roles``: role -> (version, percent); ``old``: label tuples to remove first."""
        for labels in old:
            try:
                self.traffic_share.remove(*labels)
            except KeyError:
                pass
        for role, (version, percent) in roles.items():
            self.traffic_share.labels(model, version, role).set(percent)
