"""`taskmgr bench footprint [--pollers 10000] [--runs 1]`: memory of the processes.

- manager idle: a `python -m taskmgr.cli manager` subprocess on its own database
  (`taskmgr_bench_footprint`, empty) and RabbitMQ prefix; once it leads, 8 s idle, then
  VmRSS from /proc/<pid>/status;
- runner idle: a `python -m taskmgr.cli runner` subprocess on the same; 8 s after its
  metrics endpoint answers (it consumes by then), VmRSS;
- both --runs times (fresh processes, a fresh prefix each time), the median reported and
  every run listed;
- runner holding N pollers (unless --pollers 0): `bench.runner.run_pollers` (N live-game
  pollers against the local box-score server with ETag, interval 10 s, a 10 s window),
  its VmRSS at the end.

Targets (issue 17): manager < 70 MB idle, runner < 60 MB idle (the runner with 10,000
pollers is the runner benchmark's < 250 MB).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx

from bench._common import Procs, child_env, cpu_seconds, fresh_database, log, machine, new_prefix, rss_mb
from bench.runner import run_pollers
from taskmgr import broker, store
from taskmgr.db import make_engine
from taskmgr.settings import Settings
from taskmgr.testing import free_port, wait_for

DB = "taskmgr_bench_footprint"
IDLE_S = 8.0


def _log(msg: str) -> None:
    log("footprint", msg)


async def idle_once(settings: Settings, url: str) -> dict[str, float]:
    """One manager and one runner, fresh, each measured after IDLE_S idle."""
    procs = Procs("footprint")
    prefix = new_prefix()
    topo = broker.Topology(prefix)
    engine = make_engine(url, pool_size=1, name="taskmgr-bench")
    result: dict[str, float] = {}
    try:
        port = free_port()
        manager = procs.start(["-m", "taskmgr.cli", "manager"], child_env(settings, url, prefix))

        async def leads() -> bool:
            async with engine.connect() as conn:
                return await store.leader_present(conn)

        await wait_for(leads, 30, "the manager to lead")
        c0 = cpu_seconds(manager.pid)
        await asyncio.sleep(IDLE_S)
        result["manager_idle_rss_mb"] = rss_mb(manager.pid)
        result["manager_idle_cpu_percent"] = round(100 * (cpu_seconds(manager.pid) - c0) / IDLE_S, 1)
        _log(f"manager idle: {result['manager_idle_rss_mb']} MB")

        runner = procs.start(
            ["-m", "taskmgr.cli", "runner", "--pool", "benchfoot"],
            child_env(settings, url, prefix, TASKMGR_METRICS_PORT=port),
        )

        async def up() -> bool:
            try:
                async with httpx.AsyncClient() as c:
                    return (await c.get(f"http://127.0.0.1:{port}/metrics")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_for(up, 30, "the runner's metrics endpoint")
        t = time.monotonic()
        c0 = cpu_seconds(runner.pid)
        await asyncio.sleep(IDLE_S)
        result["runner_idle_rss_mb"] = rss_mb(runner.pid)
        result["runner_idle_cpu_percent"] = round(
            100 * (cpu_seconds(runner.pid) - c0) / (time.monotonic() - t), 1
        )
        _log(f"runner idle: {result['runner_idle_rss_mb']} MB")
    finally:
        await procs.stop_all()
        await engine.dispose()
        try:
            await broker.delete_names(settings.amqp_url, topo, ["benchfoot"])
        except Exception as exc:
            _log(f"could not delete the queues of {prefix}: {exc!r}")
    return result


async def main(settings: Settings, pollers: int = 10000, runs: int = 1, **_: Any) -> dict[str, Any]:
    url = await fresh_database(settings, DB)
    result: dict[str, Any] = {"benchmark": "footprint", "machine": machine()}
    each = [await idle_once(settings, url) for _ in range(runs)]
    for key in each[0]:
        result[key] = round(statistics.median(r[key] for r in each), 1)
    result["runs"] = each
    result["targets"] = {"manager_idle_rss_mb": 70, "runner_idle_rss_mb": 60}
    result["where"] = (
        "each process a subprocess of the bench process; RSS = VmRSS from /proc/<pid>/status after "
        f"{IDLE_S:.0f} s idle (manager: leading, nothing due; runner: consuming an empty queue); "
        f"median of {runs} run(s)"
    )
    if not pollers:
        return result
    loaded = await run_pollers(
        settings, pollers=pollers, interval=10.0, seconds=10.0, etag=True, name="footprint"
    )
    result[f"runner_{pollers}_pollers_rss_mb"] = loaded["rss_mb"]
    result["runner_loaded"] = {
        k: loaded[k] for k in ("pollers", "active_pollers", "polls_per_s", "cpu_percent", "rss_mb")
    }
    result["targets"]["runner_10000_pollers_rss_mb"] = 250
    return result
