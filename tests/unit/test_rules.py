"""Each rule has one owner: the others derive from it (no database, no broker)."""

from __future__ import annotations

import click
import pytest

from taskmgr import store
from taskmgr.cli.types import NO_LIMIT, TYPE_COLUMNS, types
from taskmgr.models import TYPE_FIELDS, TaskType, TaskTypeFields


def test_the_types_options_and_columns_derive_from_the_declared_fields() -> None:
    add = types.commands["add"]
    flags = {p.name: p.opts[0] for p in add.params if isinstance(p, click.Option)}
    assert flags == {
        "file": "--file",
        "handler": "--handler",
        "url_template": "--url-template",
        "poll_interval_s": "--poll-interval",
        "payload_schema": "--payload-schema",
        "max_attempts": "--max-attempts",
        "backoff_base_s": "--backoff-base",
        "backoff_max_s": "--backoff-max",
        "request_timeout_s": "--request-timeout",
        "start_timeout_s": "--start-timeout",
        "max_consecutive_failures": "--max-consecutive-failures",
        "pool": "--pool",
        "required_services": "--required-service",
        "misfire_policy": "--misfire-policy",
        "misfire_grace_s": "--misfire-grace",
        "max_runtime_s": "--max-runtime",
        "output": "--output",
    }
    assert {p.name for p in types.commands["update"].params} == {p.name for p in add.params} | {"name"}
    by_name = {p.name: p for p in add.params}
    assert by_name["required_services"].multiple
    assert isinstance(by_name["misfire_policy"].type, click.Choice)
    assert list(by_name["misfire_policy"].type.choices) == ["coalesce", "catch_up", "skip"]
    assert "seconds" in (by_name["poll_interval_s"].help or "")
    # A field that may be empty takes a number or "none" (no limit).
    runtime = by_name["max_runtime_s"].type
    assert runtime.convert("90", None, None) == 90.0
    assert runtime.convert("none", None, None) is NO_LIMIT
    with pytest.raises(click.BadParameter):
        runtime.convert("soon", None, None)

    assert TYPE_FIELDS == tuple(TaskTypeFields.model_fields)
    assert set(TaskType.model_fields) == {*TYPE_FIELDS, "created_at", "updated_at", "deleted_at"}
    assert set(TYPE_COLUMNS) <= set(TaskType.model_fields)
    insert = store._type_query("insert_type").text
    update = store._type_query("update_type").text
    for name in TYPE_FIELDS:
        assert f":{name}" in insert and f":{name}" in update
    assert "cast(:payload_schema as jsonb)" in insert and "cast(:required_services as text[])" in update
    assert "{" not in insert and "{" not in update


def test_one_backoff_formula_for_the_manager_and_the_runner() -> None:
    import random

    from manager import intake
    from runners import poller
    from taskmgr.backoff import backoff_s

    assert intake.backoff_s is backoff_s and poller.backoff_s is backoff_s
    rng = random.Random(7)
    for n, (low, high) in {1: (1, 2), 2: (2, 4), 3: (4, 8), 20: (150, 300)}.items():
        assert all(low <= backoff_s(n, 2.0, 300.0, rng) <= high for _ in range(200))
    assert backoff_s(0, 2.0, 300.0, rng) <= 2.0  # as the first


def test_the_state_sets_are_models_own() -> None:
    import re
    from pathlib import Path

    from taskmgr.models import ACTIVE, TERMINAL, WAITING, State

    assert WAITING | ACTIVE | TERMINAL == set(State)
    assert not (WAITING & ACTIVE or WAITING & TERMINAL or ACTIVE & TERMINAL)
    assert all(s.terminal == (s in TERMINAL) for s in State)
    # No other module spells a set or tuple of states of its own.
    root = Path(__file__).resolve().parents[2]
    literal = re.compile(r"[({\[]\s*State\.[A-Z]+\s*,\s*State\.")
    spelled = [
        str(p.relative_to(root))
        for part in ("taskmgr", "manager", "runners", "task_types", "bench")
        for p in (root / part).rglob("*.py")
        if p != root / "taskmgr" / "models.py" and literal.search(p.read_text())
    ]
    assert spelled == []


def test_state_changes_judge_and_fold_once() -> None:
    import uuid
    from datetime import UTC, datetime

    import pytest

    from taskmgr.errors import IllegalTransition
    from taskmgr.models import CurrentState, State, StateChanges, Transition

    now = datetime(2026, 1, 1, tzinfo=UTC)
    tid, other = uuid.uuid4(), uuid.uuid4()
    row = CurrentState(tid, State.STARTED, 1, 0, None, None, "box", tid)
    changes = StateChanges(now, {tid: row}, strict=False)
    changes.add(Transition(tid, State.RUNNING, 1, "runner", "r-1"))
    changes.add(Transition(tid, State.STARTED, 1, "runner", "r-1"))  # RUNNING -> STARTED: illegal
    changes.add(Transition(tid, State.RUNNING, 1, "runner", "r-1", applied=False))  # kept as it is
    changes.add(Transition(other, State.FINISHED, 1, "runner"))
    changes.add(Transition(tid, State.RETRYING, 1, "runner", run_at=now, count_failure=True))
    assert [t.applied for t in changes.recorded] == [True, False, False, False, True]
    assert changes.recorded[1].detail["ignored"] == "illegal transition RUNNING -> STARTED"
    assert changes.recorded[3].detail["ignored"] == "no such task"
    folded = changes.rows[tid]
    assert changes.changed == {tid: folded}
    assert (folded.state, folded.failures, folded.run_at, folded.runner_id) == (State.RETRYING, 1, now, None)

    strict = StateChanges(now, {tid: row})
    with pytest.raises(IllegalTransition):
        strict.add(Transition(tid, State.SCHEDULED, 1, "manager"))
    with pytest.raises(IllegalTransition):
        strict.add(Transition(other, State.RUNNING, 1, "runner"))


def test_the_cancel_notice_is_one_contract() -> None:
    import json
    import uuid

    import pytest

    from taskmgr.messages import BadMessage, CancelNotice, decode_cancel, encode

    notice = CancelNotice(task_id=uuid.uuid4(), attempt=2, runner_id=None, pool="sports")
    payload = encode(notice).decode()  # what TaskService.cancel NOTIFYs
    expected = {"task_id": str(notice.task_id), "attempt": 2, "runner_id": None, "pool": "sports"}
    assert json.loads(payload) == expected
    assert decode_cancel(payload) == notice  # what the manager's listener reads
    for bad in ("", "{}", '{"task_id": "x", "attempt": 1}', json.dumps({"task_id": str(notice.task_id)})):
        with pytest.raises(BadMessage):
            decode_cancel(bad)


def test_notify_locks_and_whole_databases_are_the_data_layers() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    owned = re.compile(r"pg_notify|pg_advisory|drop database|create database|add_listener|\btext\(", re.I)
    for path in ("taskmgr/service.py", "manager/app.py", "taskmgr/migrate.py"):
        assert owned.findall((root / path).read_text()) == [], path
    assert "pg_notify" in (root / "sql" / "queries.sql").read_text()
    db = (root / "taskmgr" / "db.py").read_text()
    assert all(s in db for s in ("pg_advisory_lock", "drop database", "create database", "add_listener"))


class _Delivery:
    """A delivered message, as far as the intake's settling looks at it."""

    def __init__(self, channel: object, tag: int, body: bytes = b"{") -> None:
        self.channel, self.delivery_tag, self.body, self.user_id = channel, tag, body, "guest"
        self.calls: list[tuple[str, dict[str, bool]]] = []

    async def ack(self, **kw: bool) -> None:
        self.calls.append(("ack", kw))

    async def nack(self, **kw: bool) -> None:
        self.calls.append(("nack", kw))


async def test_a_batch_is_settled_with_one_multiple_ack_or_nack_per_channel() -> None:
    from taskmgr.broker import ack_all, requeue_all

    a, b = object(), object()
    msgs = [_Delivery(a, 1), _Delivery(b, 7), _Delivery(a, 3), _Delivery(b, 5), _Delivery(a, 2)]
    await ack_all(msgs)  # type: ignore[arg-type]
    assert [(m.delivery_tag, m.calls) for m in msgs if m.calls] == [
        (7, [("ack", {"multiple": True})]),
        (3, [("ack", {"multiple": True})]),
    ]
    for m in msgs:
        m.calls.clear()
    await requeue_all(msgs)  # type: ignore[arg-type]
    assert sorted(m.delivery_tag for m in msgs if m.calls) == [3, 7]
    assert all(m.calls == [("nack", {"multiple": True, "requeue": True})] for m in msgs if m.calls)


async def test_follow_ons_read_each_task_type_once_per_batch(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import uuid

    from taskmgr import service as service_module
    from taskmgr.handlers import FollowOn
    from taskmgr.models import Scheduled, TaskType
    from taskmgr.service import TaskService

    reads: list[str] = []

    async def get_type(conn: object, name: str) -> TaskType:
        reads.append(name)
        return TaskType(name=name, handler="noop")

    async def write_rows(self: TaskService, conn: object, rows: list[dict], now: object) -> list[Scheduled]:
        return [Scheduled(r["id"], True) for r in rows]

    monkeypatch.setattr(service_module.store, "get_type", get_type)
    monkeypatch.setattr(TaskService, "write_rows", write_rows)
    svc = TaskService(engine=None)  # type: ignore[arg-type]
    types: dict[str, TaskType] = {}  # the intake's, for one batch
    parent = {"task_id": uuid.uuid4(), "root_task_id": uuid.uuid4()}
    for key in ("p1", "p2", "p3"):
        follow_ons = [FollowOn("period_score", {}, key), FollowOn("stat_correction", {}, key)]
        await svc.schedule_follow_ons(None, parent, follow_ons, types=types)
    assert reads == ["period_score", "stat_correction"]
