# ruff: noqa: ASYNC110, ASYNC220, ASYNC230, ASYNC240
"""`taskmgr bench dispatch --tasks 10000 [--vs taskiq,procrastinate,apscheduler,celery]`: N no-op
tasks due at one instant; how fast do their start orders reach the worker side?

What runs where (separate OS processes, one 2-core machine with PostgreSQL and RabbitMQ):

- this process: creates the database `taskmgr_bench` (dropped with force and made anew)
  and the RabbitMQ prefix `bench<random>`, the task type `bench_noop` (pool `bench`,
  handler `noop`), schedules the N tasks with TaskService.schedule_many (one
  transaction), all due at the same instant T, once everything is warm;
- a Task Manager subprocess (`python -m taskmgr.cli manager`): discovery, claims
  (STARTED events + projection in one commit), publishes the start orders (persistent,
  confirms) and marks them sent;
- a receiver subprocess (`python -m bench.receiver`): consumes the `bench` start queue,
  takes the arrival time of each AMQP message, decodes it (decode_start, like a runner)
  and acks; when it has N distinct tasks it writes the arrivals to a file.

Warm-up: before T, 20 tasks of another type (`bench_warm`, same pool) are scheduled due
at once and must reach the receiver, so the manager leads, its publisher has declared the
queue and the receiver consumes.

Finish line: the arrival of the last of the N distinct tasks. `seconds` = T -> last
arrival; `throughput_per_s` = N / seconds; lateness = arrival - due time (T) per task.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from bench import peer_env
from bench._common import Procs, child_env, fresh_database, log, machine, new_prefix, percentile
from taskmgr import broker, store
from taskmgr.db import make_engine
from taskmgr.errors import InvalidInput
from taskmgr.service import NewTask, TaskService
from taskmgr.settings import Settings
from taskmgr.testing import wait_for

DB = "taskmgr_bench"
POOL = "bench"
WARMUP = 20
LEAD_S = 3.0  # T is this long after the tasks are committed


def _log(msg: str) -> None:
    log("dispatch", msg)


def summarize(n: int, due: float, arrivals: list[tuple[str, int, float, float]]) -> dict[str, Any]:
    """From (task_id, attempt, due epoch, arrival epoch): the figures."""
    first: dict[str, float] = {}
    pairs: set[tuple[str, int]] = set()
    dups = 0
    for tid, attempt, _due, at in arrivals:
        if (tid, attempt) in pairs or tid in first:
            dups += 1
        pairs.add((tid, attempt))
        if tid not in first or at < first[tid]:
            first[tid] = at
    late_ms = [(at - due) * 1000 for at in first.values()]
    buckets: dict[int, int] = {}
    for ms in late_ms:
        buckets[int(ms // 100) * 100] = buckets.get(int(ms // 100) * 100, 0) + 1
    log(
        "dispatch",
        "arrivals per 100 ms after T: " + ", ".join(f"{k}: {v}" for k, v in sorted(buckets.items())),
    )
    received = len(first)
    last = max(first.values()) if first else due
    seconds = max(last - due, 1e-9)
    return {
        "tasks": n,
        "received": received,
        "seconds": round(seconds, 3),
        "throughput_per_s": round(received / seconds, 1),
        "lateness_p50_ms": round(percentile(late_ms, 50), 1),
        "lateness_p99_ms": round(percentile(late_ms, 99), 1),
        "lateness_min_ms": round(min(late_ms), 1) if late_ms else None,
        "lateness_max_ms": round(max(late_ms), 1) if late_ms else None,
        "duplicates": dups,
    }


async def run_taskmgr(
    settings: Settings, tasks: int, profile: str | None = None
) -> dict[str, Any]:
    procs = Procs("dispatch")
    prefix = new_prefix()
    topo = broker.Topology(prefix)
    url = await fresh_database(settings, DB)
    _log(f"database {DB} ready; RabbitMQ prefix {prefix}")
    engine = make_engine(url, pool_size=2, name="taskmgr-bench")
    svc = TaskService(engine=engine)
    out = tempfile.NamedTemporaryFile(prefix="bench-arrivals-", suffix=".json", delete=False).name
    try:
        common = {
            "pool": POOL,
            "handler": "noop",
            "url_template": "http://127.0.0.1:8765/noop",
            "start_timeout_s": 3600,
            "poll_interval_s": 5,
        }
        await svc.create_type({"name": "bench_noop", **common})
        await svc.create_type({"name": "bench_warm", **common})
        env = child_env(
            settings,
            url,
            prefix,
            TASKMGR_DISPATCH_BATCH=settings.dispatch_batch,
            TASKMGR_ORDERS_PER_MESSAGE=settings.orders_per_message,
        )
        receiver = procs.start(
            [
                "-m",
                "bench.receiver",
                "--amqp-url",
                settings.amqp_url,
                "--prefix",
                prefix,
                "--pool",
                POOL,
                "--count",
                str(tasks),
                "--out",
                out,
                "--prefetch",
                str(settings.prefetch_messages),
            ],
            env,
            stdout=subprocess.PIPE,
        )
        assert receiver.stdout is not None
        line = await asyncio.to_thread(receiver.stdout.readline)
        if line.strip() != b"ready":
            raise RuntimeError(f"receiver did not start: {line!r}")
        manager_args = (
            ["-m", "taskmgr.cli", "manager"]
        )
        manager = procs.start(manager_args, env)

        async def leads() -> bool:
            async with engine.connect() as conn:
                return await store.leader_present(conn)

        await wait_for(leads, 30, "the manager to lead")
        # Warm-up: a few orders through the whole path.
        async with engine.begin() as conn:
            await svc.schedule_many(conn, [NewTask("bench_warm", {"i": i}) for i in range(WARMUP)])

        async def warmed() -> bool:
            async with engine.connect() as conn:
                return (
                    await conn.execute(
                        text(
                            "select count(*) from task_state s join tasks t on t.id = s.task_id "
                            "where t.type = 'bench_warm' and s.sent_at is not null"
                        )
                    )
                ).scalar() == WARMUP

        await wait_for(warmed, 30, "the warm-up orders")
        await asyncio.sleep(1.0)

        # The tasks, all due at T.
        t0 = time.time()
        due = datetime.now(UTC) + timedelta(seconds=LEAD_S + max(1.0, tasks / 10000))
        rows = [NewTask("bench_noop", {"i": i}, due_at=due) for i in range(tasks)]
        async with engine.begin() as conn:
            await svc.schedule_many(conn, rows)
        insert_s = time.time() - t0
        if time.time() > due.timestamp():
            _log(f"warning: scheduling took {insert_s:.1f} s, past the due time")
        _log(f"{tasks} tasks scheduled in {insert_s:.2f} s, due at {due.isoformat()}")
        spy = None
        if profile:
            await asyncio.sleep(max(0.0, due.timestamp() - time.time() - 0.3))
            spy = subprocess.Popen(
                [
                    os.path.join(os.path.dirname(sys.executable), "py-spy"),
                    "record",
                    "-p",
                    str(manager.pid),
                    "-r",
                    "200",
                    "-d",
                    "4",
                    "--format",
                    "raw",
                    "-o",
                    profile,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = due.timestamp() + 150
        while receiver.poll() is None and time.time() < deadline:
            await asyncio.sleep(0.1)
        if manager.poll() is not None:
            raise RuntimeError(f"the manager exited with {manager.returncode}")
        await procs.stop(receiver, timeout=5)
        if spy is not None:
            await asyncio.to_thread(spy.wait)
            _log(f"py-spy profile of the manager (collapsed stacks): {profile}")
        with open(out) as f:
            data = json.load(f)
        result = summarize(tasks, due.timestamp(), [tuple(a) for a in data["arrivals"]])  # type: ignore[misc]
        result["amqp_messages"] = data["messages"]
        result["schedule_seconds"] = round(insert_s, 3)
        result["settings"] = {
            "dispatch_batch": settings.dispatch_batch,
            "orders_per_message": settings.orders_per_message,
            "receiver_prefetch": settings.prefetch_messages,
            "manager": "taskmgr.cli manager",
        }
        async with engine.connect() as conn:
            mgr = (
                await conn.execute(
                    text(
                        "select percentile_cont(0.5) within group (order by (detail->>'lateness_ms')::float),"
                        " percentile_cont(0.99) within group (order by (detail->>'lateness_ms')::float)"
                        " from task_events e join tasks t on t.id = e.task_id"
                        " where e.state = 'STARTED' and t.type = 'bench_noop'"
                    )
                )
            ).one()
        result["claim_lateness_ms"] = {"p50": mgr[0], "p99": mgr[1]}
        _log(f"taskmgr: {result['throughput_per_s']}/s, p99 {result['lateness_p99_ms']} ms")
        return result
    finally:
        await procs.stop_all()
        await engine.dispose()
        try:
            await broker.delete_names(settings.amqp_url, topo, [POOL])
        except Exception as exc:
            _log(f"could not delete the queues of {prefix}: {exc!r}")
        if os.path.exists(out):
            os.unlink(out)


async def main(
    settings: Settings,
    tasks: int = 10000,
    vs: str = "",
    profile: str | None = None,
    **_: Any,
) -> dict[str, Any]:
    peers = [p.strip() for p in vs.split(",") if p.strip()]
    result: dict[str, Any] = {
        "benchmark": "dispatch",
        "where": {
            "taskmgr": "manager subprocess (python -m taskmgr.cli manager) -> RabbitMQ -> receiver "
            "subprocess (python -m bench.receiver); tasks scheduled from this process",
            "services": settings.amqp_url.rpartition("@")[2] + " RabbitMQ, PostgreSQL database " + DB,
        },
        "machine": machine(),
    }
    unknown = sorted(set(peers) - set(peer_env.MODULES))
    if unknown:
        known = ", ".join(peer_env.MODULES)
        raise InvalidInput("--vs", f"no driver for {', '.join(unknown)} (known: {known})")
    # Before the measurement: an install is slow, and the peers' modules must be
    # importable when bench.peers is first imported.
    installed = peer_env.ensure(peers)
    own = await run_taskmgr(settings, tasks, profile)
    if not peers:
        result.update(own)
        return result
    from bench import peers as peer_mod  # imports the peers' libraries: only now

    result["installed"] = installed

    result["taskmgr"] = own
    result["ratios"] = {}
    for name in peers:
        _log(f"peer {name}")
        try:
            fig = await peer_mod.run(name, settings, tasks)
        except Exception as exc:
            _log(f"peer {name} failed: {exc!r}")
            fig = {"error": repr(exc)}
        result[name] = fig
        if fig.get("throughput_per_s"):
            result["ratios"][name] = round(own["throughput_per_s"] / fig["throughput_per_s"], 2)
    return result
