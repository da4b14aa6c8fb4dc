"""The manager's Prometheus metrics (served when TASKMGR_METRICS_PORT is set)."""

from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

DISPATCHED = Counter("taskmgr_dispatched_total", "Start orders confirmed by the broker")
CLAIMED = Counter("taskmgr_claimed_total", "Tasks claimed (STARTED events written)")
LATENESS = Histogram(
    "taskmgr_dispatch_lateness_seconds",
    "Due time to STARTED",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
LATE = Counter("taskmgr_late_dispatches_total", "Tasks started later than TASKMGR_LATENESS_ALERT")
TASKS = Gauge("taskmgr_tasks", "Tasks by state", ["state"])
LEADER = Gauge("taskmgr_leader", "1 while this manager holds the leadership")
PROGRESS = Counter("taskmgr_progress_messages_total", "Progress messages handled", ["kind"])
PROGRESS_REJECTED = Counter(
    "taskmgr_progress_rejected_total",
    "Progress messages refused: their sender (RabbitMQ user) may not send that kind",
    ["kind"],
)
DEAD_LETTERED = Counter("taskmgr_dead_lettered_total", "Messages sent to the dead-letter exchange")
FOLLOW_ONS_WRITTEN = Counter(
    "taskmgr_follow_ons_written_total", "Follow-on tasks created from runners' reports"
)
BAD_RULES = Counter(
    "taskmgr_bad_recurrence_rules_total", "Recurring tasks failed at dispatch: their rule cannot be evaluated"
)
RECOVERY_GAVE_UP = Counter(
    "taskmgr_recovery_failed_total",
    "Tasks failed by recovery: taken back too often (runner_dead, start_timeout)",
    ["reason"],
)
RECOVERED = Counter("taskmgr_recovered_total", "Tasks dispatched again by recovery", ["reason"])


def set_tasks_by_state(counts: Mapping[Any, int]) -> None:
    """Set the gauge of every state, 0 where no task is: a state that emptied must not
    keep showing its last count."""
    from taskmgr.models import State

    for state in State:
        TASKS.labels(str(state)).set(counts.get(state, 0))
