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
    "Tasks failed by recovery: taken back too often (runner_dead, start_timeout) or past their "
    "max_runtime_s (expired)",
    ["reason"],
)
RECOVERED = Counter("taskmgr_recovered_total", "Tasks dispatched again by recovery", ["reason"])
RUNNERS_DEAD = Counter(
    "taskmgr_runners_dead_total",
    "Runners declared dead by recovery: no heartbeat for TASKMGR_RUNNER_DEAD_AFTER (a runner that stops "
    "on SIGTERM says so and is not counted)",
    ["pool"],
)

# The leader's readings of shared facts, refreshed every GAUGES_INTERVAL_S by the leader
# only (manager/app.py) and removed when it steps down, so a former leader's stale value
# never stands beside the new leader's: an alert takes max() over managers.
GAUGES_INTERVAL_S = 15.0
RUNNERS_LIVE = Gauge(
    "taskmgr_runners_live",
    "Live runners per pool (heartbeating, not stopped, not dead); 0 for a task type's pool without any",
    ["pool"],
)
DEAD_LETTERS = Gauge(
    "taskmgr_dead_letter_messages", "Messages waiting in the dead-letter queue (P.dead)", ["queue"]
)
LIFECYCLE_OUTBOX_AGE = Gauge(
    "taskmgr_lifecycle_outbox_age_seconds",
    "Age of the oldest state change not published yet as a lifecycle event (0: none waits, or not leading)",
)
_pools: set[str] = set()  # the pools RUNNERS_LIVE has a series for

# Label values known in advance are exported from the start (at 0), so a query or an
# alert on them has a series before the first recovery (the Prometheus guidance on
# missing series).
for _reason in ("runner_dead", "start_timeout", "dropped"):
    RECOVERED.labels(_reason)
for _reason in ("runner_dead", "start_timeout"):
    RECOVERY_GAVE_UP.labels(_reason)


def set_runners_live(counts: Mapping[str, int]) -> None:
    """Set the live runners of each pool; a pool no longer listed (its type deleted, its
    runners gone) is removed rather than left at its last count."""
    for pool in _pools - set(counts):
        RUNNERS_LIVE.remove(pool)
    for pool, n in counts.items():
        RUNNERS_LIVE.labels(pool).set(n)
        # Exported at 0 before a first death, so increase() sees that death.
        RUNNERS_DEAD.labels(pool)
    _pools.clear()
    _pools.update(counts)


def clear_leader_gauges() -> None:
    """A manager that stops leading stops reporting the leader's readings."""
    RUNNERS_LIVE.clear()
    _pools.clear()
    DEAD_LETTERS.clear()
    LIFECYCLE_OUTBOX_AGE.set(0)


def set_tasks_by_state(counts: Mapping[Any, int]) -> None:
    """Set the gauge of every state, 0 where no task is: a state that emptied must not
    keep showing its last count."""
    from taskmgr.models import State

    for state in State:
        TASKS.labels(str(state)).set(counts.get(state, 0))
