"""`taskmgr end2end -n N`: N tasks against the simulated feed, followed until they
finish or the deadline passes. Needs a manager, a runner and the feed running."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from task_types.settings import SportsSettings
from taskmgr import store
from taskmgr.db import make_engine
from taskmgr.errors import TaskTypeNotFound
from taskmgr.models import TERMINAL, State
from taskmgr.service import NewTask, TaskService
from taskmgr.settings import Settings

E2E_TYPE = "end2end"
E2E_PATH = "/static/json/liveData/scoreboard/todaysScoreboard_00.json"


async def run_end2end(settings: Settings, *, count: int, deadline_s: float, progress: bool) -> dict[str, Any]:
    engine = make_engine(settings.database_url, pool_size=2, name="taskmgr-end2end")
    service = TaskService(engine=engine)
    try:
        try:
            await service.get_type(E2E_TYPE)
        except TaskTypeNotFound:
            await service.create_type(
                {
                    "name": E2E_TYPE,
                    "handler": "noop",
                    "url_template": SportsSettings().base_urls()["nba"] + E2E_PATH,
                    "poll_interval_s": 1,
                    "max_attempts": 3,
                }
            )
        started = time.monotonic()
        async with service.session() as session, session.begin():
            ids = [
                s.id
                for s in await service.schedule_many(
                    session,
                    [NewTask(E2E_TYPE, {"provider": "nba"}, created_by="end2end") for _ in range(count)],
                )
            ]
        done: dict[State, int] = {}
        bar: Any = None
        if progress:
            from rich.progress import Progress

            bar = Progress(transient=True)
            bar.start()
            job = bar.add_task("tasks finished", total=count)
        try:
            while time.monotonic() - started < deadline_s:
                tasks = await _states(service, ids)
                done = {s: sum(1 for t in tasks if t == s) for s in State}
                if bar is not None:
                    bar.update(job, completed=done[State.FINISHED])
                if sum(done[s] for s in TERMINAL) == count:
                    break
                await asyncio.sleep(0.2)
        finally:
            if bar is not None:
                bar.stop()
        return {
            "tasks": count,
            "finished": done.get(State.FINISHED, 0),
            "failed": done.get(State.FAILED, 0),
            "unfinished": count - done.get(State.FINISHED, 0) - done.get(State.FAILED, 0),
            "seconds": round(time.monotonic() - started, 2),
            "result": "success" if done.get(State.FINISHED, 0) == count else "partial",
        }
    finally:
        await engine.dispose()


async def _states(service: TaskService, ids: list[Any]) -> list[State]:
    async with service.session() as session:
        return list((await store.states_of(session, ids)).values())
