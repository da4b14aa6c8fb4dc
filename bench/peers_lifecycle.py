# ruff: noqa: ASYNC220, ASYNC230
"""The peers of `taskmgr bench lifecycle --vs taskiq,procrastinate`: the same life as far
as their models allow: a job created at a steady rate (due at once), run by a worker
process, one HTTP GET of the same box server, done; one job in ten defers a follow-on job
from inside the job, which lives the same life. They have no RUNNING report, no
claim event and no intake: a job's `started` is when its worker began it, `finished`
when its body returned (taskiq acks then; procrastinate then marks the job succeeded).

- taskiq (taskiq + taskiq-aio-pika, the same RabbitMQ): this process sends with
  `kiq()` (persistent, publisher confirms, a classic durable queue, as bench.peers);
  `taskiq worker bench.peers_lifecycle:broker --workers 2` (one process per core; its
  defaults otherwise: qos 10, 100 async tasks each).
- procrastinate (its own database `taskmgr_bench_procrastinate_life`): this process
  defers each tick's jobs in one `batch_defer_async`; two worker processes
  (`python -m bench.peers_lifecycle procrastinate-worker`, concurrency 20 each; its
  polling and LISTEN/NOTIFY).

Every job appends `name due started finished` to a file of its worker process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx

from bench import lifecycle_pg
from bench._common import ROOT, Procs, fresh_database, new_prefix
from bench.lifecycle_common import (
    BACKLOG_S,
    DRAIN_S,
    FOLLOW_EVERY,
    CpuWindow,
    TaskTimes,
    _log,
    cpu_figures,
    figures,
    paced,
    tree_rss,
)
from bench.peers import taskiq_cleanup
from taskmgr.db import asyncpg_dsn, with_database
from taskmgr.settings import Settings
from taskmgr.testing import free_port

PROC_DB = "taskmgr_bench_procrastinate_life"
WORKERS = 2  # worker processes: one per core
_OUT = os.environ.get("BENCH_PEER_OUT", "")
_BOX = os.environ.get("BENCH_PEER_BOX", "")
_client: httpx.AsyncClient | None = None
_file: Any = None


async def _job(name: str, due: float, defer_next: Any) -> None:
    """One job's body: the GET, the follow-on of one in ten, its times to the file."""
    global _client, _file
    started = time.time()
    if _client is None:
        _client = httpx.AsyncClient(timeout=30)
    (await _client.get(f"{_BOX}/life/{name}")).raise_for_status()
    if defer_next is not None:
        await defer_next(f"f{name}", time.time())
    if _file is None:
        _file = open(f"{_OUT}.{os.getpid()}", "a")
    _file.write(f"{name} {due!r} {started!r} {time.time()!r}\n")
    _file.flush()


# -- taskiq -------------------------------------------------------------------------------


def make_taskiq(url: str, prefix: str) -> tuple[Any, Any]:
    """A broker on the names bench.peers uses (its cleanup deletes them) and the job."""
    from taskiq_aio_pika import AioPikaBroker
    from taskiq_aio_pika.exchange import Exchange
    from taskiq_aio_pika.queue import Queue, QueueType

    b = AioPikaBroker(
        url,
        exchange=Exchange(name=f"{prefix}.taskiq"),
        task_queues=[Queue(name=f"{prefix}.taskiq", type=QueueType.CLASSIC)],
        dead_letter_queue=Queue(name=f"{prefix}.taskiq.dead", type=QueueType.CLASSIC),
        delay_queue=Queue(name=f"{prefix}.taskiq.delay", type=QueueType.CLASSIC),
    )

    @b.task(task_name="bench_life")
    async def life(name: str, due: float, then: bool = False) -> None:
        async def defer_next(n: str, d: float) -> None:
            await life.kiq(n, d)

        await _job(name, due, defer_next if then else None)

    return b, life


broker: Any = None
try:
    broker, _ = make_taskiq(
        os.environ.get("TASKMGR_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        os.environ.get("BENCH_PEER_PREFIX", "benchpeer"),
    )
except ImportError:  # the optional extra is not installed
    pass


# -- procrastinate ------------------------------------------------------------------------


def procrastinate_app(dsn: str) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="bench_life", queue="life")
    async def life(name: str, due: float, then: bool = False) -> None:
        async def defer_next(n: str, d: float) -> None:
            await life.defer_async(name=n, due=d)

        await _job(name, due, defer_next if then else None)

    return app


async def procrastinate_worker(dsn: str, concurrency: int) -> None:
    app = procrastinate_app(dsn)
    async with app.open_async():
        print("ready", flush=True)
        await app.run_worker_async(queues=["life"], concurrency=concurrency, install_signal_handlers=True)


# -- the driver ---------------------------------------------------------------------------


class Peer:
    """Start the box server and the workers, create at a rate, read the workers' files."""

    name = ""
    how = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.procs = Procs(f"lifecycle/{self.name}")
        self.dir = tempfile.mkdtemp(prefix=f"bench-life-{self.name}-")
        self.out = os.path.join(self.dir, "jobs")
        self.port = free_port()
        self.box = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "BENCH_PEER_OUT": self.out,
            "BENCH_PEER_BOX": self.box,
            "TASKMGR_AMQP_URL": settings.amqp_url,
            "PYTHONPATH": ROOT,
        }
        self.jobs: dict[str, TaskTimes] = {}
        self.offsets: dict[str, int] = {}
        self.next_index = 0
        self.workers: list[subprocess.Popen[bytes]] = []
        self.http = httpx.AsyncClient(timeout=60)
        self.prefix = new_prefix()

    async def start_box(self) -> None:
        server = self.procs.start(
            ["-m", "bench.boxserver", "--port", str(self.port)], self.env, stdout=subprocess.PIPE
        )
        assert server.stdout is not None
        if (await asyncio.to_thread(server.stdout.readline)).strip() != b"ready":
            raise RuntimeError("the box server did not start")
        self.server = server

    async def close(self) -> None:
        await self.procs.stop_all()
        await self.http.aclose()
        shutil.rmtree(self.dir, ignore_errors=True)

    def read(self) -> None:
        for fname in os.listdir(self.dir):
            path = os.path.join(self.dir, fname)
            with open(path) as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
            end = data.rfind("\n") + 1
            self.offsets[path] = self.offsets.get(path, 0) + end
            for line in data[:end].splitlines():
                name, due, started, finished = line.split()
                j = self.jobs.setdefault(name, TaskTimes(float(due)))
                j.started = float(started) if j.started is None else min(j.started, float(started))
                j.finished = float(finished)

    async def open(self) -> None:
        raise NotImplementedError

    async def shutdown(self) -> None:
        raise NotImplementedError

    async def create(self, first: int, n: int) -> None:
        raise NotImplementedError

    async def warm(self) -> None:
        await self.create(0, 20)
        deadline = time.time() + 60
        while len(self.jobs) < 22:
            if time.time() > deadline:
                raise RuntimeError(f"{self.name}: the warm-up jobs did not finish within 60 s")
            await asyncio.sleep(0.2)
            self.read()

    def _names(self, first: int, last: int) -> list[str]:
        roots = [str(i) for i in range(first, last)]
        return roots + [f"f{i}" for i in range(first, last) if i % FOLLOW_EVERY == 0]

    async def step(self, rate: float, seconds: float) -> dict[str, Any]:
        _log(f"{self.name}: {rate:.0f} jobs/s for {seconds:.0f} s")
        pg_before = await lifecycle_pg.counters(self.pg) if self.pg else None
        cpu = CpuWindow({"workers": [p.pid for p in self.workers], "box_server": [self.server.pid]})
        first = self.next_index
        a = time.time()
        created = await paced(rate, seconds, self.create)
        b = time.time()
        spent = cpu.spent()
        rss = {"workers": [tree_rss(p.pid) for p in self.workers], "box_server": tree_rss(self.server.pid)}
        names = self._names(first, self.next_index)
        t0 = time.monotonic()
        while True:
            self.read()
            left = sum(1 for n in names if n not in self.jobs)
            if not left or time.monotonic() - t0 > DRAIN_S:
                break
            await asyncio.sleep(0.5)
        finished_in_window = sum(1 for j in self.jobs.values() if j.finished and a <= j.finished < b)
        polls = (await self.http.get(self.box + "/_life")).json()
        tasks = [self.jobs.get(n) or TaskTimes(0.0) for n in names]
        for n, t in zip(names, tasks, strict=True):
            t.first_poll = polls.get(n)
        out = figures(rate, created, (a, b), tasks, finished_in_window)
        out["drain_s"] = round(time.monotonic() - t0, 1)
        out.update(cpu_figures(spent, b - a, finished_in_window))
        out["rss_mb"] = rss
        if self.pg and pg_before:
            out["postgres"] = await lifecycle_pg.spent(self.pg, pg_before, finished_in_window)
        out["how"] = self.how
        if left:
            # The step failed; its backlog must clear before the next step (not measured).
            t1 = time.monotonic()
            while left and time.monotonic() - t1 < BACKLOG_S:
                await asyncio.sleep(1.0)
                self.read()
                left = sum(1 for n in names if n not in self.jobs)
            out["backlog_cleared_after_s"] = None if left else round(DRAIN_S + time.monotonic() - t1, 1)
            if left:
                out["aborted"] = f"{left} jobs unfinished {DRAIN_S + BACKLOG_S:.0f} s after the window"
        await asyncio.sleep(2.0)
        _log(
            f"{self.name} {rate:.0f}/s: created {out['created_per_s']}/s, "
            f"finished {out['finished_per_s']}/s, start p99 {out['lateness_started_ms']['p99']} ms, "
            f"held {out['held']}"
        )
        return out

    pg: asyncpg.Connection | None = None


class Taskiq(Peer):
    name = "taskiq"
    how = (
        "this process kiq()s each tick's jobs (persistent, confirms, classic durable queue); "
        f"`taskiq worker --workers {WORKERS}` (qos 10, 100 async tasks each); "
        "a follow-on is kiq()ed by the job"
    )

    async def open(self) -> None:
        self.env["BENCH_PEER_PREFIX"] = self.prefix
        await self.start_box()
        taskiq = os.path.join(os.path.dirname(sys.executable), "taskiq")
        w = subprocess.Popen(
            [
                taskiq,
                "worker",
                "bench.peers_lifecycle:broker",
                "--workers",
                str(WORKERS),
                "--log-level",
                "WARNING",
            ],
            env=self.env,
            cwd=ROOT,
        )
        self.procs.procs.append(w)
        self.workers = [w]
        self.broker, self.life = make_taskiq(self.settings.amqp_url, self.prefix)
        await self.broker.startup()
        await asyncio.sleep(3.0)  # the workers declare and consume
        await self.warm()

    async def shutdown(self) -> None:
        if hasattr(self, "broker"):
            with contextlib.suppress(Exception):
                await self.broker.shutdown()
        await self.close()
        try:
            await taskiq_cleanup(self.settings.amqp_url, self.prefix)
        except Exception as e:
            _log(f"taskiq cleanup: {e!r}")

    async def create(self, first: int, n: int) -> None:
        base = self.next_index
        self.next_index += n
        now = time.time()
        await asyncio.gather(
            *(self.life.kiq(str(i), now, i % FOLLOW_EVERY == 0) for i in range(base, base + n))
        )


class Procrastinate(Peer):
    name = "procrastinate"
    how = (
        "this process defers each tick's jobs in one batch_defer_async; "
        f"{WORKERS} worker processes (run_worker_async, concurrency 20 each), database {PROC_DB}; "
        "a follow-on is deferred by the job"
    )

    async def open(self) -> None:
        await fresh_database(self.settings, PROC_DB, migrated=False)
        dsn = asyncpg_dsn(with_database(self.settings.database_url, PROC_DB))
        self.app = procrastinate_app(dsn)
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()
        self.pg = await asyncpg.connect(dsn)
        await self.start_box()
        for _ in range(WORKERS):
            w = self.procs.start(
                ["-m", "bench.peers_lifecycle", "procrastinate-worker", "--dsn", dsn, "--concurrency", "20"],
                self.env,
                stdout=subprocess.PIPE,
            )
            assert w.stdout is not None
            await asyncio.to_thread(w.stdout.readline)
            self.workers.append(w)
        await self.warm()

    async def shutdown(self) -> None:
        await self.close()
        if hasattr(self, "app"):
            with contextlib.suppress(Exception):
                await self.app.close_async()
        if self.pg is not None:
            await self.pg.close()

    async def create(self, first: int, n: int) -> None:
        base = self.next_index
        self.next_index += n
        now = time.time()
        await self.app.tasks["bench_life"].batch_defer_async(
            *({"name": str(i), "due": now, "then": i % FOLLOW_EVERY == 0} for i in range(base, base + n))
        )


@contextlib.asynccontextmanager
async def system(name: str, settings: Settings) -> AsyncIterator[Peer]:
    peer = {"taskiq": Taskiq, "procrastinate": Procrastinate}[name](settings)
    try:
        await peer.open()
        yield peer
    finally:
        await peer.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["procrastinate-worker"])
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--concurrency", type=int, default=20)
    args = ap.parse_args()
    # Through the module's own name: the app then lives in bench.peers_lifecycle, not in
    # __main__ (procrastinate warns about an app in the main module).
    from bench.peers_lifecycle import procrastinate_worker as worker

    asyncio.run(worker(args.dsn, args.concurrency))


if __name__ == "__main__":
    main()
