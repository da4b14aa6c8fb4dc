"""Leadership is a lease: it passes within a bound however the leader stops, and a
leader that wakes after its lease passed writes nothing. Real PostgreSQL and RabbitMQ.
(A frozen manager process: tests/acceptance/test_processes.py.)"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from manager.app import TaskManager
from manager.leadership import Elector, LeadershipLost
from taskmgr import store
from taskmgr.messages import Heartbeat
from taskmgr.models import State
from taskmgr.settings import Settings
from tests.helpers import schedule

pytestmark = pytest.mark.usefixtures("clean")


async def test_a_leader_whose_lease_was_taken_over_writes_nothing(
    engine, service, settings: Settings
) -> None:  # type: ignore[no-untyped-def]
    """The leader's own clock says its lease still runs (it was frozen and just woke),
    but another manager took the lease meanwhile: its dispatch and its intake are
    refused by the fence before they write."""
    await service.create_type({"name": "box", "handler": "noop"})
    [tid] = await schedule(service, "box", 1, due_at=datetime.now(UTC) - timedelta(seconds=1))
    async with TaskManager(settings=settings.model_copy(update={"leader_lease": 30.0}), engine=engine) as old:
        assert await old.elector.campaign()
        async with engine.begin() as conn:  # its lease ran out while it was frozen
            await conn.execute(text("update taskmgr_leader set expires_at = now()"))
        new = Elector(engine=engine, lease_s=30.0, name="taskmgr-leader-other-1")
        assert await new.campaign() and new.term == (old.elector.term or 0) + 1
        assert old.elector.valid, "its own clock has not noticed"
        with pytest.raises(LeadershipLost, match="no longer holds the lease"):
            await old.dispatcher.poll_once()
        with pytest.raises(LeadershipLost):
            await old.intake.apply([Heartbeat(runner_id="r1", pool="default", at=datetime.now(UTC))])
        with pytest.raises(LeadershipLost):
            await old.recovery.run_once()
    task = await service.get_task(tid)
    assert task.state == State.SCHEDULED, "not claimed by the old leader"
    async with engine.connect() as conn:
        assert await store.leader_name(conn) == "taskmgr-leader-other-1"
        assert (await conn.execute(text("select count(*) from runners"))).scalar_one() == 0


async def test_a_leader_that_stopped_renewing_steps_down_by_its_own_clock(engine, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    elector = Elector(engine=engine, lease_s=0.3, name="taskmgr-leader-me-1")
    assert await elector.campaign()
    await asyncio.sleep(0.35)  # no renewal meanwhile: as if frozen
    assert not elector.valid
    async with engine.begin() as conn:
        with pytest.raises(LeadershipLost):
            await elector.fence(conn)
    with pytest.raises(LeadershipLost):
        await elector.renew()


async def test_a_term_handed_out_again_after_a_failover_fences_its_first_holder(engine) -> None:  # type: ignore[no-untyped-def]
    """A failover to a replica that had not received a campaign's commit (asynchronous
    replication): the manager that won term N on the old primary still believes in it,
    and the new primary hands term N out again, to another manager. Only that one
    writes; the first is fenced, cannot renew, and its resignation changes nothing."""
    dead = Elector(engine=engine, lease_s=0.1, name="taskmgr-leader-dead-9")
    assert await dead.campaign()  # term N-1: a leader that died before the failover
    await asyncio.sleep(0.15)
    first = Elector(engine=engine, lease_s=30.0, name="taskmgr-leader-first-1")
    assert await first.campaign()
    term = first.term
    async with engine.begin() as conn:  # the new primary: the lease as before that commit
        await conn.execute(
            text(
                "update taskmgr_leader set holder = 'taskmgr-leader-dead-9', term = term - 1,"
                " expires_at = now()"
            )
        )
    second = Elector(engine=engine, lease_s=30.0, name="taskmgr-leader-second-1")
    assert await second.campaign() and second.term == term
    async with engine.begin() as conn:
        with pytest.raises(LeadershipLost, match="no longer holds the lease"):
            await first.fence(conn)
    with pytest.raises(LeadershipLost):
        await first.renew()
    await first.resign()
    async with engine.begin() as conn:
        await second.fence(conn)  # the second leads on, unharmed
        assert await store.leader_name(conn) == "taskmgr-leader-second-1"
    await second.renew()
