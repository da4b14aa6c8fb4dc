"""`taskmgr bench footprint [--pollers 10000]`: memory of the processes.

- manager idle: a `python -m taskmgr.cli manager` subprocess on its own database
  (`taskmgr_bench_footprint`, empty) and RabbitMQ prefix; once it leads, 5 s idle, then
  VmRSS from /proc/<pid>/status;
- runner idle: a `python -m taskmgr.cli runner` subprocess on the same; 5 s after its
  metrics endpoint answers (it consumes by then), VmRSS;
- runner holding N pollers: `bench.runner.run_pollers` (N live-game pollers against the
  local box-score server with ETag, interval 10 s, a 10 s window), its VmRSS at the end.

Targets: manager < 100 MB idle, runner < 80 MB idle (the runner with 10,000 pollers is
the runner benchmark's < 300 MB).
"""

from __future__ import annotations

import asyncio
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
IDLE_S = 5.0


def _log(msg: str) -> None:
    log("footprint", msg)


async def main(settings: Settings, pollers: int = 10000, **_: Any) -> dict[str, Any]:
    procs = Procs("footprint")
    prefix = new_prefix()
    topo = broker.Topology(prefix)
    url = await fresh_database(settings, DB)
    engine = make_engine(url, pool_size=1, name="taskmgr-bench")
    result: dict[str, Any] = {"benchmark": "footprint", "machine": machine()}
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
    loaded = await run_pollers(
        settings, pollers=pollers, interval=10.0, seconds=10.0, etag=True, name="footprint"
    )
    result[f"runner_{pollers}_pollers_rss_mb"] = loaded["rss_mb"]
    result["runner_loaded"] = {
        k: loaded[k] for k in ("pollers", "active_pollers", "polls_per_s", "cpu_percent", "rss_mb")
    }
    result["targets"] = {
        "manager_idle_rss_mb": 100,
        "runner_idle_rss_mb": 80,
        "runner_10000_pollers_rss_mb": 300,
    }
    result["where"] = (
        "each process a subprocess of the bench process; RSS = VmRSS from /proc/<pid>/status after "
        f"{IDLE_S:.0f} s idle (manager: leading, nothing due; runner: consuming an empty queue)"
    )
    return result
