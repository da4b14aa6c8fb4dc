# ruff: noqa: ASYNC220, ASYNC230, ASYNC240
"""Peers for `taskmgr bench dispatch --vs taskiq,procrastinate`: the same workload (N no-op
tasks due at one instant T; the worker records when each task starts) on other task
libraries, one after another, on the same machine and services. Optional extra `bench`
(`pip install -e '.[bench]'`).

How each peer is driven (documented in docs/benchmarks.md):

- taskiq (taskiq + taskiq-aio-pika, the same RabbitMQ): a sender subprocess
  (`python -m bench.peers taskiq-send`) sleeps until T, then sends the N tasks with
  `task.kiq()` (persistent messages; aio-pika channel with publisher confirms, as
  taskmgr; classic durable queue `bench<random>.taskiq`, as taskmgr's start queues),
  500 sends in flight at a time. A worker subprocess (`taskiq worker bench.peers:broker
  --workers 1`, defaults otherwise: qos 10, 100 async tasks) runs `noop`, which records
  time.time() at its start. taskiq's own scheduler is not used: its schedule sources
  are polled once a minute, so "all at T" would be "at the next minute".
- procrastinate (PostgreSQL only, its own database `taskmgr_bench_procrastinate` with
  its schema): N jobs deferred with `scheduled_at = T` in one `batch_defer_async`
  (before T, like taskmgr's schedule_many); one worker subprocess
  (`python -m bench.peers procrastinate-worker`, concurrency 10, default polling and
  LISTEN/NOTIFY) whose task records time.time() at its start.

Both workers write their start times to a file when they have N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from bench._common import ROOT, Procs, log, new_prefix, percentile, with_db
from taskmgr.settings import Settings

PREFIX = os.environ.get("BENCH_PEER_PREFIX", "benchpeer")
OUT = os.environ.get("BENCH_PEER_OUT", "")
COUNT = int(os.environ.get("BENCH_PEER_COUNT", "0"))
_starts: list[tuple[int, float, float]] = []
_seen: set[int] = set()


def _record(i: int, due: float) -> None:
    _starts.append((i, due, time.time()))
    if i < 0:  # warm-up tasks
        return
    _seen.add(i)
    if COUNT and len(_seen) >= COUNT and OUT:
        with open(OUT + ".tmp", "w") as f:
            json.dump(_starts, f)
        os.replace(OUT + ".tmp", OUT)


# -- taskiq ----------------------------------------------------------------------------

broker: Any = None
noop: Any = None
try:
    from taskiq_aio_pika import AioPikaBroker
    from taskiq_aio_pika.exchange import Exchange
    from taskiq_aio_pika.queue import Queue, QueueType

    broker = AioPikaBroker(
        os.environ.get("TASKMGR_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        exchange=Exchange(name=f"{PREFIX}.taskiq"),
        task_queues=[Queue(name=f"{PREFIX}.taskiq", type=QueueType.CLASSIC)],
        dead_letter_queue=Queue(name=f"{PREFIX}.taskiq.dead", type=QueueType.CLASSIC),
        delay_queue=Queue(name=f"{PREFIX}.taskiq.delay", type=QueueType.CLASSIC),
    )

    @broker.task(task_name="bench_noop")
    async def noop(i: int, due: float) -> None:
        _record(i, due)
except ImportError:  # the optional extra is not installed
    pass


async def taskiq_send(n: int, due: float, offset: int = 0) -> None:
    await broker.startup()
    try:
        await asyncio.sleep(max(0.0, due - time.time()))
        sem = asyncio.Semaphore(500)

        async def one(i: int) -> None:
            async with sem:
                await noop.kiq(offset + i, due)

        await asyncio.gather(*(one(i) for i in range(n)))
        print(f"taskiq sender: {n} sent in {time.time() - due:.2f} s after T", file=sys.stderr, flush=True)
    finally:
        await broker.shutdown()


async def taskiq_cleanup(url: str, prefix: str) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        for q in (f"{prefix}.taskiq", f"{prefix}.taskiq.dead", f"{prefix}.taskiq.delay"):
            await ch.queue_delete(q)
        await ch.exchange_delete(f"{prefix}.taskiq")
    finally:
        await conn.close()


async def run_taskiq(settings: Settings, n: int) -> dict[str, Any]:
    procs = Procs("dispatch/taskiq")
    prefix = new_prefix()
    out = tempfile.mktemp(prefix="bench-taskiq-", suffix=".json")
    env = {
        **os.environ,
        "BENCH_PEER_PREFIX": prefix,
        "BENCH_PEER_OUT": out,
        "BENCH_PEER_COUNT": str(n),
        "TASKMGR_AMQP_URL": settings.amqp_url,
        "PYTHONPATH": ROOT,
    }
    taskiq = os.path.join(os.path.dirname(sys.executable), "taskiq")
    try:
        worker = subprocess.Popen(
            [taskiq, "worker", "bench.peers:broker", "--workers", "1", "--log-level", "WARNING"],
            env=env,
            cwd=ROOT,
        )
        procs.procs.append(worker)
        await asyncio.sleep(4.0)  # the worker's start (it declares the queue)
        # Warm-up: a few tasks through the same path.
        warm = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.peers",
                "taskiq-send",
                "--n",
                "20",
                "--offset",
                "-1000",
                "--due",
                str(time.time()),
            ],
            env={**env, "BENCH_PEER_COUNT": "0"},
            cwd=ROOT,
        )
        await asyncio.to_thread(warm.wait)
        due = time.time() + 4.0
        sender = procs.start(["-m", "bench.peers", "taskiq-send", "--n", str(n), "--due", str(due)], env)
        deadline = due + 150
        while not os.path.exists(out) and time.time() < deadline:
            if worker.poll() is not None:
                raise RuntimeError(f"taskiq worker exited with {worker.returncode}")
            await asyncio.sleep(0.1)
        await asyncio.to_thread(sender.wait)
        if not os.path.exists(out):
            raise RuntimeError("taskiq: not all tasks started within 150 s")
        with open(out) as f:
            starts = json.load(f)
        return _figures(
            n,
            due,
            [(i, at) for i, d, at in starts if d == due],
            "sender subprocess kiq() at T (500 in flight) -> RabbitMQ classic durable queue -> "
            "`taskiq worker --workers 1` (qos 10, 100 async tasks)",
        )
    finally:
        await procs.stop_all()
        try:
            await taskiq_cleanup(settings.amqp_url, prefix)
        except Exception as exc:
            log("dispatch", f"taskiq cleanup: {exc!r}")
        if os.path.exists(out):
            os.unlink(out)


# -- procrastinate -----------------------------------------------------------------------

PROC_DB = "taskmgr_bench_procrastinate"


def procrastinate_app(dsn: str) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="bench_noop", queue="bench")
    async def p_noop(i: int, due: float) -> None:
        _record(i, due)

    return app


async def procrastinate_worker(dsn: str) -> None:
    app = procrastinate_app(dsn)
    async with app.open_async():
        print("ready", flush=True)
        await app.run_worker_async(queues=["bench"], concurrency=10, install_signal_handlers=True)


async def run_procrastinate(settings: Settings, n: int) -> dict[str, Any]:
    import asyncpg

    from taskmgr.migrate import asyncpg_dsn

    procs = Procs("dispatch/procrastinate")
    admin = await asyncpg.connect(asyncpg_dsn(with_db(settings.database_url, "postgres")))
    try:
        await admin.execute(f'drop database if exists "{PROC_DB}" with (force)')
        await admin.execute(f'create database "{PROC_DB}"')
    finally:
        await admin.close()
    dsn = asyncpg_dsn(with_db(settings.database_url, PROC_DB))
    app = procrastinate_app(dsn)
    out = tempfile.mktemp(prefix="bench-procrastinate-", suffix=".json")
    env = {**os.environ, "BENCH_PEER_OUT": out, "BENCH_PEER_COUNT": str(n), "PYTHONPATH": ROOT}
    try:
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            worker = procs.start(
                ["-m", "bench.peers", "procrastinate-worker", "--dsn", dsn], env, stdout=subprocess.PIPE
            )
            assert worker.stdout is not None
            await asyncio.to_thread(worker.stdout.readline)
            await asyncio.sleep(1.0)
            t0 = time.time()
            due = t0 + 3.0 + n / 5000
            at = datetime.fromtimestamp(due, UTC)
            task = app.tasks["bench_noop"]
            deferrer = task.configure(schedule_at=at)
            await deferrer.batch_defer_async(*({"i": i, "due": due} for i in range(n)))
            log("dispatch", f"procrastinate: {n} jobs deferred in {time.time() - t0:.2f} s")
            deadline = due + 150
            while not os.path.exists(out) and time.time() < deadline:
                if worker.poll() is not None:
                    raise RuntimeError(f"procrastinate worker exited with {worker.returncode}")
                await asyncio.sleep(0.2)
            if not os.path.exists(out):
                raise RuntimeError("procrastinate: not all jobs started within 150 s")
        with open(out) as f:
            starts = json.load(f)
        return _figures(
            n,
            due,
            [(i, s) for i, d, s in starts],
            "jobs deferred with schedule_at=T in one batch_defer_async; one worker subprocess "
            "(run_worker_async, concurrency 10) in its own database " + PROC_DB,
        )
    finally:
        await procs.stop_all()
        if os.path.exists(out):
            os.unlink(out)


def _figures(n: int, due: float, starts: list[tuple[int, float]], how: str) -> dict[str, Any]:
    first: dict[int, float] = {}
    for i, at in starts:
        first[i] = min(at, first.get(i, at))
    late = [(at - due) * 1000 for at in first.values()]
    seconds = max(max(first.values()) - due, 1e-9)
    return {
        "tasks": n,
        "received": len(first),
        "seconds": round(seconds, 3),
        "throughput_per_s": round(len(first) / seconds, 1),
        "lateness_p50_ms": round(percentile(late, 50), 1),
        "lateness_p99_ms": round(percentile(late, 99), 1),
        "duplicates": len(starts) - len(first),
        "how": how,
    }


async def run(name: str, settings: Settings, n: int) -> dict[str, Any]:
    if name == "taskiq":
        if broker is None:
            return {"error": "taskiq and taskiq-aio-pika are not installed (pip install -e '.[bench]')"}
        return await run_taskiq(settings, n)
    if name == "procrastinate":
        try:
            import procrastinate  # noqa: F401
        except ImportError:
            return {"error": "procrastinate is not installed (pip install -e '.[bench]')"}
        return await run_procrastinate(settings, n)
    return {"error": f"no driver for {name!r} (known: taskiq, procrastinate)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["taskiq-send", "procrastinate-worker"])
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--due", type=float, default=0.0)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--dsn", default="")
    args = ap.parse_args()
    if args.cmd == "taskiq-send":
        asyncio.run(taskiq_send(args.n, args.due, args.offset))
    else:
        asyncio.run(procrastinate_worker(args.dsn))


if __name__ == "__main__":
    main()
