"""`taskmgr bench api --tasks 1000000`: the HTTP API's latency and throughput.

In a database of its own (`taskmgr_bench_api`, made anew, dropped at the end), with
`--tasks` tasks in it (two types, due over 30 days, 90% FINISHED, 5% CANCELLED, 3%
SCHEDULED, 2% FAILED, written by SQL in bulk), one `taskmgr api` process on a free port
(uvicorn, one worker) serves, and this process is the clients (httpx):

1. get: GET /api/v1/tasks/{id} of random ids at `--rate` requests/s (open loop: a request
   starts on time whether or not the ones before have answered) for `--seconds`:
   latency p50/p99, answered/s, errors. Goal: p99 < 50 ms at 200/s.
2. list: GET /api/v1/tasks with the common filters in turn (a type; a state, FAILED or
   SCHEDULED; a due range of a day; a type and the next page by cursor; a root), 50 a
   page, the same way. Goal: p99 < 50 ms at 200/s.
3. create: POST /api/v1/tasks/batch of 100 tasks from `--writers` (4) clients until
   `--creates` tasks are written: tasks/s; and single POSTs from 16 clients for a few
   seconds: tasks/s. Goal: >= 1,000 tasks/s.
4. SSE fan-out: `--clients` streams on /api/v1/events/stream (keys
   live_game.score.changed); score events are stored in the history (as the recorder
   would) at `--event-rate` per second for `--seconds`; delivery latency = when a client
   read the event minus when its row was committed, over every (client, event); lost
   deliveries. Goal: p99 < 500 ms to 1,000 clients.

Everything shares the machine's cores (PostgreSQL, the API process and these clients:
the client side's own parsing is part of the figure).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import httpx
from sqlalchemy import text

from bench._common import Procs, child_env, cpu_seconds, fresh_database, log, machine, percentile, rss_mb
from taskmgr import event_store, tokens
from taskmgr.db import asyncpg_dsn, make_engine, with_database
from taskmgr.messages import Event
from taskmgr.settings import Settings
from taskmgr.testing import free_port, wait_for

DB = "taskmgr_bench_api"
TYPES = ("bench_api_a", "bench_api_b")
SAMPLE_IDS = 20_000
PAGE = 50
STEP = 200_000
EVENT_KEY = "live_game.score.changed"


def _log(msg: str) -> None:
    log("api", msg)


async def _fill(engine: Any, n: int) -> None:
    """n tasks with their state rows, in bulk (triggers off: the states are set directly)."""
    async with engine.connect() as conn:
        await conn.execute(text("set synchronous_commit = off"))
        await conn.execute(text("set session_replication_role = replica"))
        done = 0
        while done < n:
            k = min(STEP, n - done)
            await conn.execute(
                text(
                    "with g as (select gen_random_uuid() as id, i"
                    " from generate_series(cast(:lo as bigint), cast(:hi as bigint)) i) "
                    "insert into tasks (id, type, payload, due_at, root_id, created_by) "
                    "select id, case when i % 2 = 0 then :a else :b end, '{}'::jsonb, "
                    "now() - interval '29 days' + (i::float8 / cast(:n as float8)) * interval '30 days',"
                    " id, 'bench' from g"
                ),
                {"lo": done + 1, "hi": done + k, "n": n, "a": TYPES[0], "b": TYPES[1]},
            )
            await conn.commit()
            done += k
        await conn.execute(
            text(
                "insert into task_state (task_id, state, attempt, failures, run_at, changed_at) "
                "select id, case when r < 0.90 then 'FINISHED' when r < 0.95 then 'CANCELLED' "
                "  when r < 0.98 then 'SCHEDULED' else 'FAILED' end, 1, 0, "
                "  case when r >= 0.95 and r < 0.98 then due_at end, now() "
                "from (select id, due_at, random() as r from tasks) t"
            )
        )
        await conn.commit()
        await conn.execute(text("analyze tasks"))
        await conn.execute(text("analyze task_state"))
        await conn.commit()


async def _explain(engine: Any, params: dict[str, Any]) -> str:
    """The plan of store.list_tasks with these filters (literal values, as a custom plan)."""
    from taskmgr.queries import q

    sql = str(q("list_tasks"))
    full = {
        "type": None,
        "state": None,
        "root_id": None,
        "due_from": None,
        "due_to": None,
        "after_due": None,
        "after_id": None,
        "limit": PAGE,
        **params,
    }
    async with engine.connect() as conn:
        rows = await conn.execute(text("explain (analyze, costs off, timing off, summary on) " + sql), full)
        return "\n".join(r[0] for r in rows)


async def _open_loop(
    rate: float, seconds: float, call: Callable[[int], Awaitable[int]], api_pid: int
) -> dict[str, Any]:
    """Requests at a fixed rate; each one's latency (from its scheduled start), and the
    API process's CPU per request."""
    latencies: list[float] = []
    errors = 0
    total = int(rate * seconds)
    cpu0 = _tree_cpu(api_pid)
    start = time.perf_counter()

    async def one(i: int, due: float) -> None:
        nonlocal errors
        try:
            status = await call(i)
            if status != 200:
                errors += 1
                return
        except (aiohttp.ClientError, TimeoutError):
            errors += 1
            return
        latencies.append((time.perf_counter() - due) * 1000)

    tasks = []
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return {
        "requests": total,
        "rate_asked": rate,
        "answered_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies, default=float("nan")), 2),
        "errors": errors,
        "api_cpu_ms_per_request": round((_tree_cpu(api_pid) - cpu0) / max(1, total) * 1000, 2),
    }


def _tree_cpu(pid: int) -> float:
    """CPU seconds of the API process and its workers (`--workers`)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in children)


def _get(session: aiohttp.ClientSession, path: str, params: dict[str, Any] | None = None) -> Awaitable[int]:
    async def go() -> int:
        async with session.get(path, params=params) as r:
            await r.read()
            return r.status

    return go()


def _list_params(i: int, ids: list[uuid.UUID], day0: datetime, cursors: list[str]) -> dict[str, Any]:
    kind = i % 5
    if kind == 0:
        return {"type": TYPES[i % 2], "limit": PAGE}
    if kind == 1:
        return {"state": "FAILED" if i % 2 else "SCHEDULED", "limit": PAGE}
    if kind == 2:
        start = day0 + timedelta(days=random.randrange(29), hours=random.randrange(24))
        return {
            "due_from": start.isoformat(),
            "due_to": (start + timedelta(days=1)).isoformat(),
            "limit": PAGE,
        }
    if kind == 3 and cursors:
        return {"type": TYPES[0], "after": random.choice(cursors), "limit": PAGE}
    return {"root": str(random.choice(ids)), "limit": PAGE}


async def _creates(client: httpx.AsyncClient, total: int, writers: int) -> dict[str, Any]:
    per_batch = 100
    batches = max(1, total // per_batch)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for b in range(batches):
        queue.put_nowait(b)
    errors = 0

    async def writer() -> None:
        nonlocal errors
        while not queue.empty():
            queue.get_nowait()
            body = {"tasks": [{"type": TYPES[0], "due_at": "2099-01-01T00:00:00Z"}] * per_batch}
            r = await client.post("/api/v1/tasks/batch", json=body)
            errors += r.status_code != 201

    t0 = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    batch_s = time.perf_counter() - t0

    singles, stop_at = 0, time.perf_counter() + 5.0

    async def single() -> None:
        nonlocal singles, errors
        while time.perf_counter() < stop_at:
            r = await client.post("/api/v1/tasks", json={"type": TYPES[1], "due_at": "2099-01-01T00:00:00Z"})
            if r.status_code == 201:
                singles += 1
            else:
                errors += 1

    t1 = time.perf_counter()
    await asyncio.gather(*(single() for _ in range(16)))
    single_s = time.perf_counter() - t1
    return {
        "batch_of": per_batch,
        "writers": writers,
        "tasks": batches * per_batch,
        "batch_tasks_per_s": round(batches * per_batch / batch_s, 1),
        "single_clients": 16,
        "single_tasks_per_s": round(singles / single_s, 1),
        "errors": errors,
    }


async def _fanout(
    base: str, secret: str, engine: Any, clients: int, event_rate: float, seconds: float
) -> dict[str, Any]:
    committed: dict[str, float] = {}
    received: list[float] = []
    counts = [0] * clients
    connected = 0
    all_connected = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=clients + 10)
    timeout = aiohttp.ClientTimeout(total=None, connect=30)
    auth = {"Authorization": f"Bearer {secret}"}
    async with aiohttp.ClientSession(base_url=base, headers=auth, connector=connector, timeout=timeout) as c:

        async def client(n: int) -> None:
            nonlocal connected
            async with c.get("/api/v1/events/stream", params={"keys": EVENT_KEY}) as r:
                connected += 1
                if connected == clients:
                    all_connected.set()
                async for raw in r.content:
                    if raw.startswith(b"data: "):
                        now = time.perf_counter()
                        eid = json.loads(raw[6:])["event_id"]
                        if eid in committed:
                            received.append((now - committed[eid]) * 1000)
                            counts[n] += 1

        readers = [asyncio.create_task(client(n)) for n in range(clients)]
        try:
            await asyncio.wait_for(all_connected.wait(), 120)
            await asyncio.sleep(1.0)  # every client subscribed to the hub
            task = uuid.uuid4()
            total = int(event_rate * seconds)
            start = time.perf_counter()
            for i in range(total):
                delay = start + i / event_rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                ev = Event(
                    event_id=uuid.uuid5(task, str(i)),
                    event="score.changed",
                    task_type="live_game",
                    task_id=task,
                    root_task_id=task,
                    task_runner_id="bench",
                    attempt=1,
                    observed_at=datetime.now(UTC),
                    data={
                        "provider": "nba",
                        "game_id": "bench",
                        "home_score": i,
                        "away_score": 0,
                        "period": 1,
                        "league": "nba",
                        "home_team": "BOS",
                        "away_team": "NYK",
                    },
                )
                async with engine.begin() as conn:
                    await event_store.record_events(conn, [ev])
                committed[str(ev.event_id)] = time.perf_counter()
            expected = total * clients
            await wait_for(lambda: _done(received, expected), timeout=30, every=0.2)
        except TimeoutError:
            pass
        finally:
            for t in readers:
                t.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    return {
        "clients": clients,
        "events": total,
        "event_rate": event_rate,
        "deliveries": len(received),
        "lost": total * clients - len(received),
        "p50_ms": round(percentile(received, 50), 1),
        "p99_ms": round(percentile(received, 99), 1),
        "max_ms": round(max(received, default=float("nan")), 1),
    }


async def _done(received: list[float], expected: int) -> bool:
    return len(received) >= expected


async def main(
    settings: Settings,
    tasks: int = 1_000_000,
    rate: float = 200.0,
    seconds: float = 20.0,
    creates: int = 20_000,
    writers: int = 4,
    clients: int = 1000,
    event_rate: float = 2.0,
    api_workers: int = 1,
    **_: Any,
) -> dict[str, Any]:
    url = await fresh_database(settings, DB)
    engine = make_engine(url, pool_size=4, name="taskmgr-bench")
    procs = Procs("api")
    result: dict[str, Any] = {
        "bench": "api",
        "tasks": tasks,
        "machine": machine(),
        "load_average_at_start": os.getloadavg(),
    }
    try:
        async with engine.begin() as conn:
            for t in TYPES:
                await conn.execute(
                    text("insert into task_types (name, handler) values (:n, 'noop')"), {"n": t}
                )
            _token, secret = await tokens.create_token(conn, "bench", "write")
        _log(f"filling {tasks:,} tasks")
        t0 = time.perf_counter()
        await _fill(engine, tasks)
        result["fill_s"] = round(time.perf_counter() - t0, 1)
        async with engine.connect() as conn:
            ids = [
                r[0]
                for r in await conn.execute(
                    text("select id from tasks tablesample system (5) limit :n"), {"n": SAMPLE_IDS}
                )
            ]
            day0 = (await conn.execute(text("select min(due_at) from tasks"))).scalar_one()
        result["plans"] = {
            "type": await _explain(engine, {"type": TYPES[0]}),
            "state_failed": await _explain(engine, {"state": "FAILED"}),
            "state_scheduled": await _explain(engine, {"state": "SCHEDULED"}),
            "due_range": await _explain(
                engine, {"due_from": day0 + timedelta(days=3), "due_to": day0 + timedelta(days=4)}
            ),
            "root": await _explain(engine, {"root_id": ids[0]}),
        }
        port = free_port()
        env = child_env(settings, url, "benchapi", TASKMGR_API_PORT=port, TASKMGR_LOG_LEVEL="WARNING")
        api = procs.start(["-m", "taskmgr.cli", "api", "--workers", str(api_workers)], env)
        result["api_workers"] = api_workers
        base = f"http://127.0.0.1:{port}"
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        auth = {"Authorization": f"Bearer {secret}"}
        connector = aiohttp.TCPConnector(limit=100)
        async with (
            httpx.AsyncClient(base_url=base, limits=limits, timeout=30, headers=auth) as c,
            aiohttp.ClientSession(
                base_url=base, headers=auth, connector=connector, timeout=aiohttp.ClientTimeout(total=120)
            ) as session,
        ):
            await wait_for(lambda: _ready(c), timeout=60, what="the API answers /readyz")
            # Warm-up: a few of each, then the cursors the paging test follows.
            for i in range(50):
                await c.get(f"/api/v1/tasks/{ids[i]}")
            page = (await c.get("/api/v1/tasks", params={"type": TYPES[0], "limit": PAGE})).json()
            cursors = []
            for _page in range(20):
                if page["next"] is None:
                    break
                cursors.append(page["next"])
                page = (
                    await c.get(
                        "/api/v1/tasks", params={"type": TYPES[0], "limit": PAGE, "after": page["next"]}
                    )
                ).json()
            _log(f"get at {rate}/s for {seconds} s")
            result["get"] = await _open_loop(
                rate, seconds, lambda i: _get(session, f"/api/v1/tasks/{random.choice(ids)}"), api.pid
            )
            _log(f"get: {result['get']}")
            _log(f"list at {rate}/s for {seconds} s")
            result["list"] = await _open_loop(
                rate,
                seconds,
                lambda i: _get(session, "/api/v1/tasks", _list_params(i, ids, day0, cursors)),
                api.pid,
            )
            _log(f"list: {result['list']}")
            result["create"] = await _creates(c, creates, writers)
            _log(f"create: {result['create']}")
        result["fanout"] = await _fanout(base, secret, engine, clients, event_rate, seconds)
        _log(f"fanout: {result['fanout']}")
        result["api_rss_mb"] = rss_mb(api.pid)  # the parent's (with --workers, one worker's is similar)
    finally:
        await procs.stop_all()
        await engine.dispose()
        await _drop(settings)
    result["goals"] = {
        "get_p99_under_50ms": result.get("get", {}).get("p99_ms", 1e9) < 50,
        "list_p99_under_50ms": result.get("list", {}).get("p99_ms", 1e9) < 50,
        "create_1000_per_s": result.get("create", {}).get("batch_tasks_per_s", 0) >= 1000,
        "fanout_p99_under_500ms": result.get("fanout", {}).get("p99_ms", 1e9) < 500,
    }
    return result


async def _ready(c: httpx.AsyncClient) -> bool:
    try:
        return (await c.get("/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


async def _drop(settings: Settings) -> None:
    import asyncpg

    admin = await asyncpg.connect(asyncpg_dsn(with_database(settings.database_url, "postgres")))
    try:
        await admin.execute(f'drop database if exists "{DB}" with (force)')
    finally:
        await admin.close()
