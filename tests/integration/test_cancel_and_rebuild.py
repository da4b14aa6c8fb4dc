"""Cancelling one occurrence of a recurring task, and `rebuild-state` beside a leader,
against the real PostgreSQL (and through the CLI)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from click.testing import CliRunner, Result

from manager.dispatch import Dispatcher
from taskmgr.broker import Publisher
from taskmgr.cli import main
from taskmgr.migrate import asyncpg_dsn
from taskmgr.models import State
from taskmgr.service import TaskService
from taskmgr.settings import Settings

pytestmark = pytest.mark.usefixtures("clean")

T0 = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)  # ahead: not a misfire


@pytest.fixture
def cli(settings: Settings):  # type: ignore[no-untyped-def]
    env = {
        "TASKMGR_DATABASE_URL": settings.database_url,
        "TASKMGR_AMQP_URL": settings.amqp_url,
        "TASKMGR_AMQP_PREFIX": settings.amqp_prefix,
        "TASKMGR_LOG_LEVEL": "WARNING",
    }

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)

    return invoke


async def _recurring(service: TaskService, due_at: datetime = T0) -> uuid.UUID:
    await service.create_type({"name": "poll", "handler": "noop"})
    async with service.session() as s, s.begin():
        return (await service.schedule(s, "poll", {"g": 1}, due_at=due_at, recurrence={"every_s": 60})).id


async def _series(service: TaskService, root: uuid.UUID) -> list[tuple[datetime, int, State]]:
    return [(t.due_at, t.occurrence, t.state) for t in await service.list_tasks(root_id=root, limit=10)]


async def test_cancelling_a_scheduled_occurrence_keeps_the_series(service: TaskService) -> None:
    first = await _recurring(service)
    await service.cancel(first)
    assert await _series(service, first) == [
        (T0, 1, State.CANCELLED),
        (T0 + timedelta(seconds=60), 2, State.SCHEDULED),
    ]
    [_, second] = await service.list_tasks(root_id=first, limit=10)
    assert second.parent_id == first and second.dedup_key == f"{first}:next"
    # Cancelling the next one too keeps it going again, once each.
    await service.cancel(second.id)
    assert [o for _, o, _ in await _series(service, first)] == [1, 2, 3]


async def test_cancelling_with_series_ends_it_even_after_dispatch(  # type: ignore[no-untyped-def]
    engine, service, settings
) -> None:
    first = await _recurring(service)
    await service.cancel(first, series=True)
    assert await _series(service, first) == [(T0, 1, State.CANCELLED)]
    # A dispatched occurrence has its successor written already: series=True cancels it too.
    other = await _recurring_again(service)
    async with Publisher(url=settings.amqp_url, topology=_topology(settings)) as pub:
        disp = Dispatcher(
            engine=engine,
            publisher=pub,
            service=TaskService(engine=engine, clock=lambda: T0),
            settings=settings,
            clock=lambda: T0,
        )
        assert (await disp.poll_once()).claimed == 1
    await service.cancel(other, series=True)
    assert [s for _, _, s in await _series(service, other)] == [State.CANCELLED, State.CANCELLED]


async def _recurring_again(service: TaskService) -> uuid.UUID:
    async with service.session() as s, s.begin():
        return (await service.schedule(s, "poll", {"g": 2}, due_at=T0, recurrence={"every_s": 60})).id


def _topology(settings: Settings):  # type: ignore[no-untyped-def]
    from taskmgr.broker import Topology

    return Topology(settings.amqp_prefix)


def test_cli_cancel_with_and_without_series(cli, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    first = asyncio.run(_recurring_cli(settings.database_url))
    one = cli("tasks", "cancel", str(first), "-o", "json")
    assert one.exit_code == 0, one.output
    listed = json.loads(cli("tasks", "list", "--root", str(first), "-o", "json").stdout)
    assert sorted(t["state"] for t in listed) == ["CANCELLED", "SCHEDULED"]
    nxt = next(t["id"] for t in listed if t["state"] == "SCHEDULED")
    ended = cli("tasks", "cancel", nxt, "--series", "-o", "json")
    assert ended.exit_code == 0, ended.output
    listed = json.loads(cli("tasks", "list", "--root", str(first), "-o", "json").stdout)
    assert sorted(t["state"] for t in listed) == ["CANCELLED", "CANCELLED"]


async def _recurring_cli(database_url: str) -> uuid.UUID:
    """Written on an engine of its own: the CLI runs its own event loops."""
    from taskmgr.db import make_engine

    engine = make_engine(database_url)
    try:
        return await _recurring(TaskService(engine=engine))
    finally:
        await engine.dispose()


async def _hold_leadership(database_url: str) -> asyncpg.Connection:
    """A live leadership lease, as a leading manager holds it."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    await conn.execute(
        "insert into taskmgr_leader (holder, term, expires_at, renewed_at)"
        " values ('taskmgr-leader-test-1', 1, now() + interval '1 hour', now())"
        " on conflict (id) do update set expires_at = excluded.expires_at, holder = excluded.holder"
    )
    return conn


async def failures(conn: asyncpg.Connection, tid: uuid.UUID) -> int:
    return int(await conn.fetchval("select failures from task_state where task_id = $1", tid))


def test_rebuild_state_refuses_while_a_leader_is_active(cli, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    async def setup() -> tuple[asyncpg.Connection, uuid.UUID]:
        tid = await _recurring_cli(settings.database_url)
        leader = await _hold_leadership(settings.database_url)
        # A projection that differs from the history: a rebuild would change it back.
        await leader.execute("update task_state set failures = 7 where task_id = $1", tid)
        return leader, tid

    loop = asyncio.new_event_loop()
    try:
        leader, tid = loop.run_until_complete(setup())
        refused = cli("rebuild-state")
        assert refused.exit_code == 1
        assert "leader" in refused.stderr and "--force" in refused.stderr
        assert loop.run_until_complete(failures(leader, tid)) == 7, "nothing changed"
        forced = cli("rebuild-state", "--force")
        assert forced.exit_code == 0, forced.output
        assert loop.run_until_complete(failures(leader, tid)) == 0
        loop.run_until_complete(leader.execute("update taskmgr_leader set expires_at = now()"))  # resigns
        loop.run_until_complete(leader.close())
    finally:
        loop.close()
    assert cli("rebuild-state").exit_code == 0, "no leader: it runs"
