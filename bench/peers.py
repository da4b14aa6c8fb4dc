# ruff: noqa: ASYNC220, ASYNC230, ASYNC240
"""Peers for `taskmgr bench dispatch --vs taskiq,procrastinate,apscheduler,celery`: the same workload (N no-op
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
- apscheduler (APScheduler 3, its own database `taskmgr_bench_apscheduler`): N jobs with a
  date trigger at T (misfire_grace_time=None, other job defaults) added beforehand to a
  SQLAlchemyJobStore (psycopg2), one INSERT each; then one worker subprocess
  (`python -m bench.peers apscheduler-worker`) with an AsyncIOScheduler on that store and
  its default executor (AsyncIOExecutor); the job is a coroutine recording its start.
  20 already-due warm-up jobs run as the worker starts.
- celery (Celery 5, the same RabbitMQ, no result backend): a worker
  (`celery -A bench.peers:celery_app worker --pool prefork --concurrency 2`, queue,
  exchange, control and event exchanges named `bench<random>.celery…`, no mingle, gossip
  or remote control); 20 warm-up tasks without ETA, then a sender subprocess
  (`python -m bench.peers celery-send`) calls `apply_async(eta=T)` N times before T. The
  task appends its start time to a file of its own pool process.

The taskiq, procrastinate and apscheduler workers write their start times to a file when
they have N; the bench process reads the celery files until they hold N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from bench._common import ROOT, Procs, fresh_database, log, new_prefix, percentile
from taskmgr.db import with_database
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
    from taskmgr.db import asyncpg_dsn

    procs = Procs("dispatch/procrastinate")
    await fresh_database(settings, PROC_DB, migrated=False)  # the peer's own schema
    dsn = asyncpg_dsn(with_database(settings.database_url, PROC_DB))
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


# -- APScheduler 3 -------------------------------------------------------------------------

APS_DB = "taskmgr_bench_apscheduler"


def aps_url(database_url: str) -> str:
    """The SQLAlchemy URL of the APScheduler database with the sync driver (psycopg2)."""
    url = with_database(database_url, APS_DB).partition("?")[0]
    return "postgresql+psycopg2://" + url.partition("://")[2]


async def aps_noop(i: int, due: float) -> None:
    _record(i, due)


def aps_add(url: str, n: int, due: float, offset: int = 0) -> None:
    """Add n date-trigger jobs at `due` to the SQLAlchemyJobStore: the Job that
    `scheduler.add_job` makes (defaults but misfire_grace_time=None), one INSERT each, with
    no scheduler thread (a paused BackgroundScheduler runs due jobs once as it shuts down)."""
    from apscheduler.job import Job
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.date import DateTrigger

    sched = BackgroundScheduler(timezone=UTC)  # never started: only what Job needs
    store = SQLAlchemyJobStore(url=url)
    store.start(sched, "default")
    try:
        at = datetime.fromtimestamp(due, UTC)
        trigger = DateTrigger(at, timezone=UTC)
        for i in range(n):
            job = Job(
                sched,
                id=f"bench-{offset + i}",
                func="bench.peers:aps_noop",
                trigger=trigger,
                executor="default",
                args=(offset + i, due),
                kwargs={},
                name="aps_noop",
                misfire_grace_time=None,
                coalesce=True,
                max_instances=1,
                next_run_time=at,
            )
            store.add_job(job)
    finally:
        store.shutdown()


async def aps_worker(url: str) -> None:
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    # The default executor of AsyncIOScheduler: AsyncIOExecutor (coroutine jobs on the loop).
    sched = AsyncIOScheduler(jobstores={"default": SQLAlchemyJobStore(url=url)}, timezone=UTC)
    sched.start()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    sched.shutdown(wait=False)


async def run_apscheduler(settings: Settings, n: int) -> dict[str, Any]:

    procs = Procs("dispatch/apscheduler")
    await fresh_database(settings, APS_DB, migrated=False)  # the peer's own schema
    url = aps_url(settings.database_url)
    out = tempfile.mktemp(prefix="bench-apscheduler-", suffix=".json")
    env = {**os.environ, "BENCH_PEER_OUT": out, "BENCH_PEER_COUNT": str(n), "PYTHONPATH": ROOT}
    try:
        # Warm-up: 20 jobs already due, run by the worker as it starts.
        await asyncio.to_thread(aps_add, url, 20, time.time(), -1000)
        t0 = time.time()
        due = t0 + 8.0 + n / 400
        await asyncio.to_thread(aps_add, url, n, due)
        log("dispatch", f"apscheduler: {n} jobs added in {time.time() - t0:.2f} s")
        # Started after the jobs are in the store: a running scheduler is not woken by jobs
        # added from another process.
        worker = procs.start(
            ["-m", "bench.peers", "apscheduler-worker", "--url", url], env, stdout=subprocess.PIPE
        )
        assert worker.stdout is not None
        await asyncio.to_thread(worker.stdout.readline)
        if time.time() > due - 1.0:
            raise RuntimeError("apscheduler: the jobs were not added and the worker up 1 s before T")
        deadline = due + 150
        while not os.path.exists(out) and time.time() < deadline:
            if worker.poll() is not None:
                raise RuntimeError(f"apscheduler worker exited with {worker.returncode}")
            await asyncio.sleep(0.2)
        if not os.path.exists(out):
            raise RuntimeError("apscheduler: not all jobs started within 150 s")
        with open(out) as f:
            starts = json.load(f)
        return _figures(
            n,
            due,
            [(i, s) for i, d, s in starts if d == due],
            "N date-trigger jobs at T (misfire_grace_time=None) added beforehand to a SQLAlchemyJobStore "
            f"(psycopg2) in database {APS_DB}; one worker subprocess with an AsyncIOScheduler and its "
            "default AsyncIOExecutor, the job a coroutine recording its start",
        )
    finally:
        await procs.stop_all()
        if os.path.exists(out):
            os.unlink(out)


# -- Celery 5 ------------------------------------------------------------------------------

celery_app: Any = None
celery_noop: Any = None
try:
    from celery import Celery

    celery_app = Celery(
        PREFIX, broker=os.environ.get("TASKMGR_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    celery_app.conf.update(
        task_default_queue=f"{PREFIX}.celery",
        task_default_exchange=f"{PREFIX}.celery",
        task_default_routing_key=f"{PREFIX}.celery",
        control_exchange=f"{PREFIX}.celery",
        event_exchange=f"{PREFIX}.celeryev",
        task_ignore_result=True,
        worker_enable_remote_control=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    _celery_file: Any = None

    @celery_app.task(name="bench_noop")
    def celery_noop(i: int, due: float) -> None:
        global _celery_file
        at = time.time()
        if _celery_file is None:  # one file per pool process, a line per task
            _celery_file = open(f"{OUT}.{os.getpid()}", "a")
        _celery_file.write(f"{i} {due!r} {at!r}\n")
        _celery_file.flush()
except ImportError:  # the optional extra is not installed
    pass


def celery_send(n: int, due: float, offset: int = 0) -> None:
    eta = datetime.fromtimestamp(due, UTC) if due > time.time() else None
    with celery_app.producer_or_acquire() as producer:
        for i in range(n):
            celery_noop.apply_async((offset + i, due), eta=eta, producer=producer)
    when = f", {due - time.time():.2f} s before T" if eta else " (no ETA)"
    print(f"celery sender: {n} sent{when}", file=sys.stderr, flush=True)


def _celery_lines(out: str) -> list[tuple[int, float, float]]:
    rows: list[tuple[int, float, float]] = []
    d = os.path.dirname(out) or "."
    base = os.path.basename(out) + "."
    for name in os.listdir(d):
        if name.startswith(base):
            with open(os.path.join(d, name)) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 3:
                        rows.append((int(parts[0]), float(parts[1]), float(parts[2])))
    return rows


async def celery_cleanup(url: str, prefix: str) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        await ch.queue_delete(f"{prefix}.celery")
        for ex in (f"{prefix}.celery", f"{prefix}.celery.pidbox", f"{prefix}.celeryev"):
            await ch.exchange_delete(ex)
    finally:
        await conn.close()


async def run_celery(settings: Settings, n: int) -> dict[str, Any]:
    procs = Procs("dispatch/celery")
    prefix = new_prefix()
    out = os.path.join(tempfile.mkdtemp(prefix="bench-celery-"), "starts")
    env = {
        **os.environ,
        "BENCH_PEER_PREFIX": prefix,
        "BENCH_PEER_OUT": out,
        "TASKMGR_AMQP_URL": settings.amqp_url,
        "PYTHONPATH": ROOT,
    }
    worker: subprocess.Popen[bytes] | None = None
    try:
        worker = procs.start(
            [
                "-m",
                "celery",
                "-A",
                "bench.peers:celery_app",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                "2",
                "-Q",
                f"{prefix}.celery",
                "-n",
                f"{prefix}@%h",
                "--without-mingle",
                "--without-gossip",
                "--loglevel",
                "WARNING",
            ],
            env,
            stdout=sys.stderr,  # its banner is not the benchmark's JSON
            start_new_session=True,  # its pool processes are killed with it
        )
        # Warm-up: 20 tasks without ETA through the same path; also shows the worker consumes.
        warm = procs.start(["-m", "bench.peers", "celery-send", "--n", "20", "--offset", "-1000"], env)
        await asyncio.to_thread(warm.wait)
        deadline = time.time() + 60
        while len(_celery_lines(out)) < 20:
            if worker.poll() is not None or time.time() > deadline:
                raise RuntimeError("celery: the worker did not run the 20 warm-up tasks within 60 s")
            await asyncio.sleep(0.2)
        due = time.time() + 4.0 + n / 2000
        sender = procs.start(["-m", "bench.peers", "celery-send", "--n", str(n), "--due", str(due)], env)
        await asyncio.to_thread(sender.wait)
        if time.time() > due:
            raise RuntimeError("celery: the sender was not done before T")
        deadline = due + 150
        while time.time() < deadline:
            starts = [(i, at) for i, d, at in _celery_lines(out) if d == due]
            if len({i for i, _ in starts}) >= n:
                break
            if worker.poll() is not None:
                raise RuntimeError(f"celery worker exited with {worker.returncode}")
            await asyncio.sleep(0.5)
        else:
            raise RuntimeError("celery: not all tasks started within 150 s")
        return _figures(
            n,
            due,
            starts,
            "sender subprocess apply_async(eta=T) for all N before T -> RabbitMQ classic durable queue "
            "-> `celery worker --pool prefork --concurrency 2` (prefetch multiplier 4, no result backend), "
            "the task recording its start",
        )
    finally:
        await procs.stop_all()
        if worker is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.pid, signal.SIGKILL)
        try:
            await celery_cleanup(settings.amqp_url, prefix)
        except Exception as exc:
            log("dispatch", f"celery cleanup: {exc!r}")
        shutil.rmtree(os.path.dirname(out), ignore_errors=True)


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


PEERS = ("taskiq", "procrastinate", "apscheduler", "celery")


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
    if name == "apscheduler":
        try:
            import apscheduler  # noqa: F401
            import psycopg2  # noqa: F401
        except ImportError:
            return {"error": "apscheduler or psycopg2 is not installed (pip install -e '.[bench]')"}
        return await run_apscheduler(settings, n)
    if name == "celery":
        if celery_app is None:
            return {"error": "celery is not installed (pip install -e '.[bench]')"}
        return await run_celery(settings, n)
    return {"error": f"no driver for {name!r} (known: {', '.join(PEERS)})"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "cmd", choices=["taskiq-send", "procrastinate-worker", "apscheduler-worker", "celery-send"]
    )
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--due", type=float, default=0.0)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--dsn", default="")
    ap.add_argument("--url", default="")
    args = ap.parse_args()
    if args.cmd == "taskiq-send":
        asyncio.run(taskiq_send(args.n, args.due, args.offset))
    elif args.cmd == "procrastinate-worker":
        asyncio.run(procrastinate_worker(args.dsn))
    elif args.cmd == "apscheduler-worker":
        asyncio.run(aps_worker(args.url))
    else:
        celery_send(args.n, args.due, args.offset)


if __name__ == "__main__":
    main()
