"""The API's Prometheus metrics (served at /metrics with the process's others)."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("taskmgr_api_requests_total", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram(
    "taskmgr_api_request_seconds",
    "Time to answer a request (to the response's start for a stream)",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
STREAM_CLIENTS = Gauge("taskmgr_api_stream_clients", "Clients connected to the live event stream")
STREAM_SENT = Gauge("taskmgr_api_stream_events_sent", "Events handed to stream clients since the start")
