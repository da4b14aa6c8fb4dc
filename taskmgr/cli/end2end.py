"""`taskmgr end2end -n N`: N tasks of two task types against the simulated feed (or the
real APIs), followed until they finish or the deadline passes, with a progress bar on
stderr in every output mode. Needs a manager, a runner and the feed running."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rich.console import Console
from rich.progress import Progress

from task_types.settings import SportsSettings
from taskmgr import store
from taskmgr.db import make_engine
from taskmgr.errors import TaskTypeNotFound
from taskmgr.models import TERMINAL, State
from taskmgr.service import NewTask, TaskService
from taskmgr.settings import Settings

# A mix of two task types, each polling one provider's day listing once.
E2E_TYPES = {
    "end2end": ("nba", "/static/json/liveData/scoreboard/todaysScoreboard_00.json"),
    "end2end_espn": ("espn", "/apis/site/v2/sports/basketball/nba/scoreboard"),
}


async def run_end2end(settings: Settings, *, count: int, deadline_s: float) -> dict[str, Any]:
    engine = make_engine(settings.database_url, pool_size=2, name="taskmgr-end2end")
    service = TaskService(engine=engine)
    bases = SportsSettings().base_urls()
    try:
        for name, (provider, path) in E2E_TYPES.items():
            try:
                await service.get_type(name)
            except TaskTypeNotFound:
                await service.create_type(
                    {
                        "name": name,
                        "handler": "noop",
                        "url_template": bases[provider] + path,
                        "poll_interval_s": 1,
                        "max_attempts": 3,
                    }
                )
        started = time.monotonic()
        types = list(E2E_TYPES)
        async with service.session() as session, session.begin():
            news = [NewTask(types[i % len(types)], {}, created_by="end2end") for i in range(count)]
            ids = [s.id for s in await service.schedule_many(session, news)]
        done: dict[State, int] = {}
        # On stderr, so that --output json or yaml keeps stdout for the result alone.
        bar = Progress(console=Console(stderr=True), transient=True)
        bar.start()
        job = bar.add_task("tasks finished", total=count)
        try:
            while time.monotonic() - started < deadline_s:
                tasks = await _states(service, ids)
                done = {s: sum(1 for t in tasks if t == s) for s in State}
                bar.update(job, completed=done[State.FINISHED])
                if sum(done[s] for s in TERMINAL) == count:
                    break
                await asyncio.sleep(0.2)
        finally:
            bar.stop()
        return {
            "tasks": count,
            "types": {name: len(range(i, count, len(types))) for i, name in enumerate(types)},
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
