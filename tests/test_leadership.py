"""Leadership is a lease: it passes within a bound however the leader stops, and a
leader that wakes after its lease passed writes nothing. Real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from manager.app import TaskManager
from manager.leadership import Elector, LeadershipLost
from taskmgr import store
from taskmgr.messages import Heartbeat
from taskmgr.models import State
from taskmgr.settings import Settings
from tests.helpers import as_role, schedule

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


async def test_a_standby_takes_over_a_frozen_leader_which_then_writes_nothing(
    engine, service, settings: Settings, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    """Two manager processes; the leader is SIGSTOPped (its connections stay open, its
    kernel answers TCP keepalives): the standby leads within lease + retry + the idle
    transaction timeout. SIGCONT: the old leader finds its lease gone and stays a
    standby; the tasks due afterwards are each started once."""
    from tests.test_acceptance import env_of

    lease = 3.0
    env = env_of(
        settings,
        "taskmgr_manager",
        TASKMGR_LEADER_LEASE=lease,
        TASKMGR_LEADER_RETRY=0.3,
        TASKMGR_DATABASE_URL=as_role(database_url, "taskmgr_manager"),
    )
    await service.create_type({"name": "box", "handler": "noop"})
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskmgr.cli",
            "manager",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(2)
    ]

    async def leader_pid() -> int | None:
        async with engine.connect() as conn:
            name = await store.leader_name(conn)
        return int(name.rsplit("-", 1)[1]) if name else None

    try:
        async with asyncio.timeout(30):
            while (first := await leader_pid()) not in {p.pid for p in procs}:
                await asyncio.sleep(0.1)
        frozen = next(p for p in procs if p.pid == first)
        frozen.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        async with asyncio.timeout(30):
            while (second := await leader_pid()) in (first, None):
                await asyncio.sleep(0.05)
        handover_s = time.monotonic() - stopped_at
        print(f"hand-over after SIGSTOP: {handover_s:.2f} s (lease {lease} s)")
        assert handover_s < lease + 0.3 + 3.0 + 2.0, handover_s
        frozen.send_signal(signal.SIGCONT)
        ids = await schedule(service, "box", 20, due_at=datetime.now(UTC))
        async with asyncio.timeout(30):
            while [t for t in ids if (await service.get_task(t)).state is not State.STARTED]:
                await asyncio.sleep(0.1)
        await asyncio.sleep(lease)  # the woken one has had time to try
        assert await leader_pid() == second, "the woken leader did not take the lease back"
        assert frozen.returncode is None, "it lives on as a standby"
        async with engine.connect() as conn:
            doubles = (
                await conn.execute(
                    text(
                        "select count(*) from (select task_id, attempt from task_events"
                        " where state = 'STARTED' and applied group by 1, 2 having count(*) > 1) x"
                    )
                )
            ).scalar_one()
        assert doubles == 0
    finally:
        for p in procs:
            if p.returncode is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            await p.wait()
