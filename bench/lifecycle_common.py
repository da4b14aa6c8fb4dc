"""What `taskmgr bench lifecycle` shares between taskmgr and the peers: creating at a
steady rate, the search for the highest rate held, figures from per-task times, CPU and
RSS of process trees, the PostgreSQL counters (WAL, transactions, rows written)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bench._common import cpu_seconds, log, percentile, rss_mb, services_cpu, services_cpu_spent

TICK_S = 0.1  # tasks are created in one batch per tick: rate x 0.1 at a time
FOLLOW_EVERY = 10  # one task in ten has a follow-on
P99_GOAL_MS = 1000.0
HELD_CREATED_SHARE = 0.97  # a step holds its rate if it created at least this share of it
# After a failed step, how long its backlog may take to clear before the next step.
DRAIN_S = 60.0  # after a window, its tasks have this long to finish (or the step failed)
BACKLOG_S = 240.0


def _log(msg: str) -> None:
    log("lifecycle", msg)


async def paced(rate: float, seconds: float, create: Callable[[int, int], Awaitable[None]]) -> dict[str, Any]:
    """Call create(first_index, n) once per tick so that `rate` tasks/s are created for
    `seconds`; a tick that runs late is caught up by the next (the count follows the clock)."""
    t0 = time.monotonic()
    made, k, late = 0, 0, 0.0
    while True:
        now = time.monotonic() - t0
        if now >= seconds:
            break
        target = min(int(rate * seconds), int(rate * min(seconds, (k + 1) * TICK_S)))
        if target > made:
            await create(made, target - made)
            made = target
        k += 1
        late = max(late, time.monotonic() - t0 - k * TICK_S)
        await asyncio.sleep(max(0.0, t0 + k * TICK_S - time.monotonic()))
    return {
        "created": made,
        "seconds": round(time.monotonic() - t0, 2),
        "creator_behind_max_s": round(late, 3),
    }


def tree_pids(pid: int) -> list[int]:
    """A process and its descendants (a worker that forks its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree_pids(pid):
        try:
            total += cpu_seconds(p)
        except OSError:
            continue
    return total


def tree_rss(pid: int) -> float:
    total = 0.0
    for p in tree_pids(pid):
        try:
            total += rss_mb(p)
        except OSError:
            continue
    return round(total, 1)


class CpuWindow:
    """CPU seconds of named process trees, of this process and of PostgreSQL and
    RabbitMQ (all their processes: shared with whatever else uses them) over a window."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.before = {name: sum(tree_cpu(p) for p in ps) for name, ps in pids.items()}
        self.me = cpu_seconds(os.getpid())
        self.services = services_cpu()

    def spent(self) -> dict[str, float]:
        out = {
            name: round(sum(tree_cpu(p) for p in ps) - self.before[name], 2) for name, ps in self.pids.items()
        }
        out["bench_process_creator"] = round(cpu_seconds(os.getpid()) - self.me, 2)
        out.update(services_cpu_spent(self.services))
        return out


def cpu_figures(cpu: dict[str, float], seconds: float, tasks: int) -> dict[str, Any]:
    return {
        "cpu_seconds": cpu,
        "cores": {k: round(v / seconds, 2) for k, v in cpu.items()},
        "cpu_us_per_task": {k: round(v / tasks * 1e6) for k, v in cpu.items()} if tasks else {},
        "cpu_us_per_task_total": round(sum(cpu.values()) / tasks * 1e6) if tasks else None,
    }


@dataclass
class TaskTimes:
    """One task's (or peer job's) times, epoch seconds."""

    due: float
    started: float | None = None  # the claim (taskmgr) or the job's start in the worker (peers)
    first_poll: float | None = None
    finished: float | None = None


def figures(
    rate: float,
    created: dict[str, Any],
    window: tuple[float, float],
    tasks: Sequence[Any],
    finished_in_window: int,
    extra_lags: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """The step's figures from each task's times (epoch s) and the creator's counts.
    `tasks`: every task created in the window (roots and follow-ons)."""
    a, b = window
    seconds = b - a
    late_start = [(t.started - t.due) * 1000 for t in tasks if t.started is not None]
    late_poll = [(t.first_poll - t.due) * 1000 for t in tasks if t.first_poll is not None]
    done = sum(t.finished is not None for t in tasks)
    out: dict[str, Any] = {
        "rate": rate,
        "window_s": round(seconds, 2),
        "created": created["created"],
        "created_per_s": round(created["created"] / seconds, 1),
        "creator_behind_max_s": created["creator_behind_max_s"],
        "tasks_in_window": len(tasks),
        "finished_of_those": done,
        "unfinished": len(tasks) - done,
        "finished_per_s": round(finished_in_window / seconds, 1),
        "lateness_started_ms": _p(late_start),
        "lateness_first_poll_ms": _p(late_poll),
    }
    for name, values in (extra_lags or {}).items():
        out[name] = _p(values)
    # Held: every task of the window finished, the rate was created, and the p99 lateness
    # to STARTED (the claim) and to the first poll are both under 1 s (a runner polls a new
    # task at once; until 2026-12-07 it waited a random phase of up to 1 s first, and the
    # first poll was judged apart).
    kept = bool(tasks and done == len(tasks) and created["created"] >= HELD_CREATED_SHARE * rate * seconds)
    out["held_to_first_poll"] = kept and out["lateness_first_poll_ms"]["p99"] < P99_GOAL_MS
    out["held"] = out["held_to_first_poll"] and out["lateness_started_ms"]["p99"] < P99_GOAL_MS
    return out


def _p(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
    return {
        "p50": round(percentile(values, 50), 1),
        "p99": round(percentile(values, 99), 1),
        "max": round(max(values), 1),
        "n": len(values),
    }


class System(Protocol):
    name: str

    async def step(self, rate: float, seconds: float) -> dict[str, Any]: ...


async def find_max(system: System, start: float, seconds: float, max_steps: int) -> dict[str, Any]:
    """The highest rate the system holds for `seconds` (every task finished, p99 lateness
    under 1 s): doubling from `start` until a step fails, then halving the gap between
    the highest held and the lowest failed until they are within 10 %."""
    lo, hi = 0.0, None
    rate = start
    steps: list[dict[str, Any]] = []
    while len(steps) < max_steps:
        fig = await system.step(rate, seconds)
        steps.append(fig)
        _log(f"{system.name} find-max: {rate:.0f}/s {'held' if fig['held'] else 'NOT held'}")
        if fig["held"]:
            lo = rate
        else:
            hi = rate if hi is None else min(hi, rate)
        if fig.get("aborted"):
            break
        if hi is None:
            rate = lo * 2
        elif lo == 0:
            rate = hi / 2
        else:
            if (hi - lo) <= 0.1 * lo:
                break
            rate = (lo + hi) / 2
        rate = round(rate / 10) * 10 or 10
    return {
        "max_rate_held": lo,
        "lowest_rate_failed": hi,
        "steps": [
            {
                k: f.get(k)
                for k in (
                    "rate",
                    "held",
                    "held_to_first_poll",
                    "created_per_s",
                    "finished_per_s",
                    "unfinished",
                    "lateness_started_ms",
                    "lateness_first_poll_ms",
                    "aborted",
                )
            }
            for f in steps
        ],
        "held_step": next((f for f in steps if f["held"] and f["rate"] == lo), None),
    }
