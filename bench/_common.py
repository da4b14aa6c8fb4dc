# ruff: noqa: ASYNC110
"""Pieces the benchmarks share: their own database and RabbitMQ prefix, subprocesses that
are always stopped, per-process CPU and memory from /proc, percentiles, the machine.
(Ports, role URLs and waiting are taskmgr.testing's, shared with the tests.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from taskmgr.db import with_database
from taskmgr.migrate import recreate_database
from taskmgr.settings import Settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(name: str, msg: str) -> None:
    print(f"[bench {name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def fresh_database(settings: Settings, db: str, *, migrated: bool = True) -> str:
    """A database of the benchmark's own on the settings' server, made anew (and
    migrated); returns its SQLAlchemy URL."""
    url = with_database(settings.database_url, db)
    await recreate_database(url, migrated=migrated)
    return url


def new_prefix() -> str:
    return f"bench{uuid.uuid4().hex[:8]}"


def child_env(settings: Settings, database_url: str, prefix: str, **extra: Any) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "TASKMGR_DATABASE_URL": database_url,
            "TASKMGR_AMQP_URL": settings.amqp_url,
            "TASKMGR_AMQP_PREFIX": prefix,
            "TASKMGR_LOG_LEVEL": "WARNING",
            "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Procs:
    """Subprocesses started by a benchmark; `stop_all` (SIGTERM, then SIGKILL) in a finally."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: Sequence[str], env: Mapping[str, str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, *args], env=dict(env), cwd=ROOT, **kw)
        self.procs.append(p)
        log(self.name, f"started pid {p.pid}: {' '.join(args)}")
        return p

    async def stop(self, p: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while p.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()

    async def stop_all(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                await self.stop(p)
        self.procs.clear()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def services_cpu() -> dict[str, dict[int, float]]:
    """CPU seconds of every PostgreSQL and RabbitMQ (beam.smp) process now, by pid: two
    snapshots give what the services spent in between (a pid new in the second counts
    whole)."""
    out: dict[str, dict[int, float]] = {"postgres": {}, "rabbitmq": {}}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
            kind = "postgres" if comm == "postgres" else "rabbitmq" if comm == "beam.smp" else None
            if kind:
                out[kind][int(entry)] = cpu_seconds(int(entry))
        except OSError:
            continue  # gone meanwhile
    return out


def services_cpu_spent(before: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds each service spent since `before` (a services_cpu() snapshot)."""
    now = services_cpu()
    return {
        kind: round(sum(cpu - before[kind].get(pid, 0.0) for pid, cpu in pids.items()), 2)
        for kind, pids in now.items()
    }


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f.readline().split(":", 1)[1].strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory": mem,
        "python": platform.python_version(),
        "note": "PostgreSQL, RabbitMQ and every benchmark process share these cores",
    }
