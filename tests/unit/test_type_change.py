"""The control queue's messages (a stop, a task type's new values) and what a TypeChange
carries from a task type (no database, no broker)."""

from __future__ import annotations

import json
import uuid

import pytest

from taskmgr.messages import BadMessage, Stop, TypeChange, decode_control, decode_type_change, encode
from taskmgr.models import EXPIRED, TaskType, runtime_deadline


def test_a_control_queue_carries_stops_and_type_changes() -> None:
    stop = Stop(task_id=uuid.uuid4(), attempt=2, reason=EXPIRED)
    assert decode_control(encode(stop)) == stop
    t = TaskType(name="live_game", handler="live_game", poll_interval_s=2, max_runtime_s=3600)
    change = TypeChange.of(t)
    assert (change.name, change.poll_interval_s, change.max_runtime_s) == ("live_game", 2, 3600)
    assert (change.request_timeout_s, change.max_consecutive_failures) == (10.0, 5)
    assert decode_control(encode(change)) == change
    assert decode_type_change(encode(change).decode()) == change
    assert TypeChange.of(TaskType(name="x", handler="noop")).max_runtime_s is None


@pytest.mark.parametrize(
    "body",
    [
        {
            "kind": "type",
            "name": "t",
            "poll_interval_s": 0,
            "request_timeout_s": 1,
            "max_consecutive_failures": 1,
        },
        {
            "kind": "type",
            "name": "t",
            "poll_interval_s": 1,
            "request_timeout_s": 1,
            "max_consecutive_failures": 1,
            "max_runtime_s": -5,
        },
        {
            "kind": "type",
            "name": "",
            "poll_interval_s": 1,
            "request_timeout_s": 1,
            "max_consecutive_failures": 1,
        },
        {"kind": "restart", "task_id": str(uuid.uuid4())},
        {"kind": "stop", "task_id": "not a uuid", "attempt": 1, "reason": "x"},
    ],
)
def test_a_malformed_control_message_is_refused_with_the_reason(body: dict[str, object]) -> None:
    with pytest.raises(BadMessage, match="control message: "):
        decode_control(json.dumps(body).encode())


def test_no_limit_means_no_deadline() -> None:
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    assert runtime_deadline(t0, None) is None and runtime_deadline(None, 60) is None
    assert runtime_deadline(t0, 90) == t0 + timedelta(seconds=90)
