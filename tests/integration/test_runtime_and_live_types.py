"""Tasks that end (a type's max_runtime_s, enforced by the runner and by recovery) and
live type changes (`types update` reaches running pollers through the leader's control
broadcast), with a real TaskManager and TaskRunner on the real PostgreSQL and RabbitMQ;
the API is an httpx.MockTransport that never lets a task finish."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from manager.app import TaskManager
from manager.signals import ManagerSignals
from runners.runner import TaskRunner
from runners.signals import RunnerSignals
from taskmgr.cli import main
from taskmgr.errors import InvalidInput
from taskmgr.handlers import BaseHandler, Outcome, PollContext, Registry
from taskmgr.models import EXPIRED, State
from taskmgr.service import TaskService
from taskmgr.settings import Settings
from tests.helpers import schedule, wait_for

pytestmark = pytest.mark.usefixtures("clean")


class ForeverHandler(BaseHandler):
    """A game that stays live: never done."""

    name: ClassVar[str] = "forever"

    def handle(self, ctx: PollContext, response: httpx.Response) -> Outcome:
        return Outcome()


def _api(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"live": True})


@dataclass
class System:
    manager: TaskManager
    runner: TaskRunner
    msignals: ManagerSignals
    rsignals: RunnerSignals


@contextlib.asynccontextmanager
async def _system(engine: Any, settings: Settings) -> AsyncIterator[System]:
    """A leading manager and a runner, running until the block ends."""
    stop = asyncio.Event()
    msignals, rsignals = ManagerSignals(), RunnerSignals()
    async with TaskManager(settings=settings, engine=engine, signals=msignals) as manager:
        mrun = asyncio.create_task(manager.run(stop))
        await wait_for(lambda: _true(manager.is_leader.is_set()))
        async with TaskRunner(
            settings=settings,
            registry=Registry([ForeverHandler()]),
            transport=httpx.MockTransport(_api),
            runner_id=f"runner-{uuid.uuid4().hex[:6]}",
            signals=rsignals,
        ) as runner:
            rrun = asyncio.create_task(runner.run(stop))
            await rsignals.consuming.wait()
            try:
                yield System(manager, runner, msignals, rsignals)
            finally:
                stop.set()
                await asyncio.gather(mrun, rrun)


async def _true(value: bool) -> bool:
    return value


async def _last_event(engine: Any, task_id: uuid.UUID) -> dict[str, Any]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "select state, source, attempt, detail from task_events"
                    " where task_id = :id and applied order by seq desc limit 1"
                ),
                {"id": task_id},
            )
        ).one()
    return dict(row._mapping)


async def _forever_type(service: TaskService, **values: Any) -> None:
    await service.create_type(
        {
            "name": "forever",
            "handler": "forever",
            "url_template": "http://api.test/game",
            "max_attempts": 3,
            **values,
        }
    )


async def _state(service: TaskService, task_id: uuid.UUID) -> State:
    return (await service.get_task(task_id)).state


async def test_the_runner_ends_a_task_at_its_max_runtime_and_it_is_not_retried(
    engine: Any, service: TaskService, settings: Settings
) -> None:
    # Recovery waits an hour: only the runner can end the task here.
    quiet = settings.model_copy(update={"recovery_interval": 3600.0})
    await _forever_type(service, poll_interval_s=0.2, max_runtime_s=1.5)
    async with _system(engine, quiet) as s:
        (task_id,) = await schedule(service, "forever", 1)
        poller = await s.rsignals.poller_started.wait()
        assert poller.order.max_runtime_s == 1.5 and poller.order.started_at is not None
        await s.rsignals.poller_ended.wait(within_s=5)
        assert poller.ticks >= 3  # it polled until the deadline, then stopped
        await wait_for(lambda: _is(service, task_id, State.FAILED), timeout=5)
        last = await _last_event(engine, task_id)
        assert last["source"] == "runner" and last["detail"]["reason"] == EXPIRED
        assert last["detail"]["final"] is True
        # Final: max_attempts 3 would retry any other failure.
        await asyncio.sleep(1.0)
        task = await service.get_task(task_id)
        assert (task.state, task.attempt) == (State.FAILED, 1)
        assert s.rsignals.poller_started.count == 1


async def test_recovery_ends_a_task_past_its_max_runtime_and_stops_its_silent_runner(
    engine: Any, service: TaskService, settings: Settings
) -> None:
    # Dispatched without a limit, so the runner does not know one; the limit is then set
    # behind the manager's back (no broadcast): only recovery can end the task.
    await _forever_type(service, poll_interval_s=0.2)
    async with _system(engine, settings) as s:
        (task_id,) = await schedule(service, "forever", 1)
        poller = await s.rsignals.poller_started.wait()
        assert poller.order.max_runtime_s is None
        await wait_for(lambda: _is(service, task_id, State.RUNNING), timeout=5)
        async with engine.begin() as conn:
            await conn.execute(text("update task_types set max_runtime_s = 1 where name = 'forever'"))
        await wait_for(lambda: _is(service, task_id, State.FAILED), timeout=10)
        last = await _last_event(engine, task_id)
        assert last["source"] == "manager" and last["detail"]["reason"] == EXPIRED
        assert last["detail"]["max_runtime_s"] == 1
        # Its runner was told to stop, though it never reported anything about it.
        stopped = await s.rsignals.stopped.wait(within_s=5)
        assert stopped is poller
        assert s.rsignals.stop_handled.last is not None
        assert s.rsignals.stop_handled.last.reason == EXPIRED
        await asyncio.sleep(1.0)
        assert await _state(service, task_id) is State.FAILED


async def test_types_update_reaches_a_running_poller_within_seconds(
    engine: Any, service: TaskService, settings: Settings
) -> None:
    await _forever_type(service, poll_interval_s=30.0)
    env = {
        "TASKMGR_DATABASE_URL": settings.database_url,
        "TASKMGR_AMQP_URL": settings.amqp_url,
        "TASKMGR_AMQP_PREFIX": settings.amqp_prefix,
    }

    def types_update(*flags: str) -> str:
        result = CliRunner().invoke(main, ["types", "update", "forever", *flags], env=env)
        assert result.exit_code == 0, result.output
        return result.output

    async with _system(engine, settings) as s:
        await schedule(service, "forever", 1)
        poller = await s.rsignals.poller_started.wait()
        await s.rsignals.ticked.wait()  # its first tick; the next would be 30 s later
        ticks = s.rsignals.ticked.count
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.to_thread(types_update, "--poll-interval", "0.2", "--request-timeout", "3")
        change = await s.msignals.type_broadcast.wait()
        assert (change.name, change.poll_interval_s) == ("forever", 0.2)
        await s.rsignals.retuned.wait()
        # Within a few seconds it polls every 0.2 s, not after its 30 s wait.
        await s.rsignals.ticked.wait(count=ticks + 5, within_s=5)
        assert loop.time() - t0 < 5
        assert (poller.order.interval_s, poller.order.request_timeout_s) == (0.2, 3.0)
        assert s.rsignals.poller_started.count == 1  # the same poller, not a new dispatch
        # max_runtime_s too: the task has run longer than 1 s already, so it ends now.
        await asyncio.to_thread(types_update, "--max-runtime", "1")
        await s.rsignals.poller_ended.wait(within_s=5)
        assert poller.order.max_runtime_s == 1.0
        # And `none` takes the limit away again.
        await asyncio.to_thread(types_update, "--max-runtime", "none")
        assert (await service.get_type("forever")).max_runtime_s is None


async def test_bad_type_values_change_nothing_and_broadcast_nothing(
    engine: Any, service: TaskService, settings: Settings
) -> None:
    await _forever_type(service, poll_interval_s=5.0)
    async with _system(engine, settings) as s:
        for bad in ({"poll_interval_s": 0}, {"max_runtime_s": -1}, {"request_timeout_s": "soon"}):
            with pytest.raises(InvalidInput):
                await service.update_type("forever", **bad)
        env = {"TASKMGR_DATABASE_URL": settings.database_url, "TASKMGR_AMQP_PREFIX": settings.amqp_prefix}
        for flags in (["--max-runtime", "0"], ["--max-runtime", "soon"], ["--poll-interval", "-1"]):
            result = await asyncio.to_thread(
                CliRunner().invoke, main, ["types", "update", "forever", *flags], env=env
            )
            assert result.exit_code == 2, (flags, result.output)
        await asyncio.sleep(0.5)
        assert s.msignals.type_broadcast.count == 0
    t = await service.get_type("forever")
    assert (t.poll_interval_s, t.max_runtime_s, t.request_timeout_s) == (5.0, None, 10.0)


async def _is(service: TaskService, task_id: uuid.UUID, state: State) -> bool:
    return await _state(service, task_id) is state
