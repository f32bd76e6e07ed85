"""Prometheus metrics: requests, latency, jobs by state, predict batch sizes."""

from __future__ import annotations

import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select

from app.catalog import JOB_STATES, Catalog, Job

REQUESTS = Counter(
    "lego_http_requests_total",
    "HTTP requests by method, route and status",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "lego_http_request_duration_seconds",
    "HTTP request latency by method and route",
    ["method", "route"],
)
JOBS = Gauge("lego_jobs", "Jobs in the catalog by state and kind", ["state", "kind"])
PREDICT_BATCH = Histogram(
    "lego_predict_batch_size",
    "Images per model call in predict",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
PREDICT_IMAGES = Counter("lego_predict_images_total", "Images classified by predict")
# Several API processes can share a port (LEGO_API_PROCESSES) and each answers /metrics
# with its own counters: the pid says which process a scrape reached.
API_PROCESS = Gauge("lego_api_process", "The API process that answered (by pid)", ["pid"])
API_PROCESS.labels(pid=str(os.getpid())).set(1)


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times requests by their route template."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The route template, not the raw path (whose ids would explode the labels).
            template = getattr(scope.get("route"), "path", None) or "unmatched"
            REQUESTS.labels(scope["method"], template, str(status["code"])).inc()
            LATENCY.labels(scope["method"], template).observe(time.perf_counter() - start)


def render(catalog: Catalog) -> tuple[bytes, str]:
    with catalog.session() as s:
        rows = s.execute(select(Job.status, Job.kind, func.count()).group_by(Job.status, Job.kind))
        counts = {(st, kind): n for st, kind, n in rows}
    JOBS.clear()
    for kind in {k for _, k in counts} or {"locate", "assemble"}:
        for state in JOB_STATES:
            JOBS.labels(state, kind).set(counts.get((state, kind), 0))
    return generate_latest(), CONTENT_TYPE_LATEST
