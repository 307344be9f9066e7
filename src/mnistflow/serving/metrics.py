"""Prometheus metrics: requests, latencies and batch sizes per endpoint, and the model served.

Each app has its own CollectorRegistry (not prometheus_client's global one), so several
apps in one process (tests) count apart. With several worker processes (`serve --workers`),
prometheus_client's multiprocess mode adds up the requests, latencies and batches of all of
them, whichever answers /metrics; the model's state is that worker's (each follows the alias).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnistflow.serving.model import ModelFollower

# Most requests take well under a millisecond; the tail goes to seconds under overload.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The app's metrics and their registry."""

    def __init__(self, follower: ModelFollower) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mnistflow_http_requests",
            "HTTP requests by route and status code.",
            ["handler", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mnistflow_http_request_duration_seconds",
            "Time from request to the end of the response, by route.",
            ["handler"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mnistflow_batch_size",
            "Digits classified per request, by route.",
            ["handler"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.model_calls = Histogram(
            "mnistflow_model_batch_size",
            "Digits per model call: micro-batching gathers the digits of concurrent requests.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.model = ModelCollector(follower)
        self.registry.register(self.model)
        # The series by their labels: labels() takes a lock and validates every call.
        self.batches: dict[str, Histogram] = {}
        self.served: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    def observe_batch(self, handler: str, digits: int) -> None:
        series = self.batches.get(handler)
        if series is None:
            series = self.batches[handler] = self.batch_size.labels(handler)
        series.observe(digits)

    def observe_request(self, handler: str, status: int, seconds: float) -> None:
        series = self.served.get((handler, status))
        if series is None:
            series = self.served[handler, status] = (
                self.requests.labels(handler, str(status)),
                self.latency.labels(handler),
            )
        series[0].inc()
        series[1].observe(seconds)

    def observe_model_call(self, digits: int) -> None:
        self.model_calls.observe(digits)

    def exposition(self) -> bytes:
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        # The workers' counts, from the files each of them writes (see serving/server.py).
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(self.model)
        return generate_latest(registry)


class ModelCollector(Collector):
    """The follower's state, read at scrape time so it can never go stale."""

    def __init__(self, follower: ModelFollower) -> None:
        self.follower = follower

    def collect(self) -> Iterator[InfoMetricFamily | GaugeMetricFamily | CounterMetricFamily]:
        served = self.follower.current
        yield GaugeMetricFamily(
            "mnistflow_model_ready",
            "1 when a model is loaded and serving.",
            float(served is not None),
        )
        if served is not None:
            yield InfoMetricFamily(
                "mnistflow_model",
                "The model serving now.",
                {k: v or "" for k, v in served.describe().items()},
            )
        loads = CounterMetricFamily(
            "mnistflow_model_loads", "Model loads by outcome.", labels=["outcome"]
        )
        loads.add_metric(["loaded"], self.follower.loads)
        loads.add_metric(["failed"], self.follower.failures)
        yield loads


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (pure ASGI: no body copy).

    The label is the matched route's path (a fixed set) or "unmatched", so that random
    paths cannot grow the number of series.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            handler = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(handler, status, time.perf_counter() - started)
