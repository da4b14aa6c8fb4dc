"""The runner's Prometheus metrics (module level: one set per process, shared by every
TaskRunner in it). Nothing is served unless `settings.metrics_port` is set."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ACTIVE_POLLERS = Gauge("taskmgr_runner_active_pollers", "Periodic coroutines running now")
POLLS = Counter(
    "taskmgr_runner_polls_total",
    "API polls by host and outcome (ok, not_modified, timeout, connect, http_5xx, http_429, ...)",
    ["host", "outcome"],
)
POLL_DURATION = Histogram(
    "taskmgr_runner_poll_duration_seconds",
    "Time of one API request, from sending to having the body",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
TICK_DRIFT = Histogram(
    "taskmgr_runner_tick_drift_seconds",
    "How late a tick started against its schedule",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
EVENTS_PUBLISHED = Counter("taskmgr_runner_events_published_total", "Events published (confirmed)")
FOLLOW_ONS_SENT = Counter(
    "taskmgr_runner_follow_ons_sent_total", "Follow-on tasks sent to the manager in reports"
)
REPORTS_PUBLISHED = Counter("taskmgr_runner_reports_total", "Reports published, by status", ["status"])
