"""`taskmgr bench runner --pollers 10000 --interval 10 --seconds 30 [--etag both|on|off]`:
one TaskRunner process holding N live-game pollers against a local box-score server.

What runs where (separate OS processes on the same 2-core machine as PostgreSQL and
RabbitMQ):

- the box-score server (`python -m bench.boxserver`, aiohttp): a recorded NBA live box
  score (~32 KB compact JSON, made live in the 1st quarter) for any game id, with or
  without an ETag (a matching If-None-Match gets 304); it counts requests;
- ONE runner (`python -m taskmgr.cli runner --pool benchpoll`, TASKMGR_FEED_URL pointing
  the NBA provider at the server, TASKMGR_METRICS_PORT for its Prometheus metrics), with
  its own database `taskmgr_bench_runner` and RabbitMQ prefix `bench<random>`;
- this process publishes N start orders itself (type and handler `live_game`, NBA
  provider, one game id each, interval --interval s; 200 orders per message, as the
  manager packs them) to the pool's start queue; no manager runs (the runner's reports
  wait in the progress queue, deleted at the end).

A game that stays live never finishes, so every poller keeps polling. Warm-up: until
every poller has polled once and the first-poll events (game.started, score.changed per
game) are published, and one more interval. Then a window of --seconds:
`polls_per_s` = the server's request count over the window / seconds (with an ETag,
`not_modified_share` says how many were 304); `tick_drift_p99_ms` = from the runner's
taskmgr_runner_tick_drift_seconds histogram over the window (interpolated within its
buckets, so coarse: 100/250/500 ms bounds); `cpu_percent` = the runner's utime+stime
(/proc/<pid>/stat) over the window, in % of one core; `rss_mb` = VmRSS at the end.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx

from bench._common import Procs, child_env, cpu_seconds, fresh_database, log, machine, new_prefix, rss_mb
from taskmgr import broker
from taskmgr.messages import StartBatch, StartOrder, encode
from taskmgr.settings import Settings
from taskmgr.testing import free_port

DB = "taskmgr_bench_runner"
POOL = "benchpoll"
PER_MESSAGE = 200
METRIC_RE = re.compile(r"^(\w+)(?:\{([^}]*)\})? ([0-9.e+-]+|NaN|\+Inf)$")


def _log(msg: str) -> None:
    log("runner", msg)


async def scrape(client: httpx.AsyncClient, port: int) -> dict[str, Any]:
    """The runner's metrics we use: drift buckets, polls by outcome, events, active."""
    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    out: dict[str, Any] = {"drift": {}, "polls": {}, "active": 0.0, "events": 0.0}
    for line in text.splitlines():
        m = METRIC_RE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "taskmgr_runner_tick_drift_seconds_bucket":
            le = re.search(r'le="([^"]+)"', labels).group(1)  # type: ignore[union-attr]
            out["drift"][float(le)] = value
        elif name == "taskmgr_runner_polls_total":
            outcome = re.search(r'outcome="([^"]+)"', labels).group(1)  # type: ignore[union-attr]
            out["polls"][outcome] = out["polls"].get(outcome, 0) + value
        elif name == "taskmgr_runner_active_pollers":
            out["active"] = value
        elif name == "taskmgr_runner_events_published_total":
            out["events"] = value
    return out


def hist_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The q-quantile of a cumulative histogram's increase, interpolated in its bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    prev_b, prev_c = 0.0, 0.0
    for b, c in zip(bounds, counts, strict=True):
        if c >= rank:
            if b == float("inf"):
                return prev_b
            return prev_b + (b - prev_b) * ((rank - prev_c) / max(c - prev_c, 1e-9))
        prev_b, prev_c = b, c
    return bounds[-1]


async def publish_orders(settings: Settings, topo: broker.Topology, n: int, interval: float) -> None:
    now = datetime.now(UTC)
    orders = []
    for i in range(n):
        tid = uuid.uuid4()
        orders.append(
            StartOrder.model_construct(
                task_id=tid,
                attempt=1,
                root_task_id=tid,
                type="live_game",
                handler="live_game",
                payload={"provider": "nba", "league": "nba", "game_id": f"00{i:08d}"},
                url_template="{base}{game_path}",
                interval_s=interval,
                request_timeout_s=10.0,
                max_consecutive_failures=5,
                due_at=now,
                claimed_at=now,
            )
        )
    async with broker.Publisher(url=settings.amqp_url, topology=topo, name="bench-runner") as pub:
        await asyncio.gather(
            *(
                pub.publish_start(
                    POOL,
                    encode(StartBatch.model_construct(orders=orders[i : i + PER_MESSAGE], sent_at=now)),
                    message_id=uuid.uuid4().hex,
                )
                for i in range(0, n, PER_MESSAGE)
            )
        )


async def run_pollers(
    settings: Settings, *, pollers: int, interval: float, seconds: float, etag: bool, name: str = "runner"
) -> dict[str, Any]:
    """One runner with `pollers` live pollers; the figures over a window of `seconds`."""
    procs = Procs(name)
    prefix = new_prefix()
    topo = broker.Topology(prefix)
    url = await fresh_database(settings, DB)
    http_port, metrics_port = free_port(), free_port()
    client = httpx.AsyncClient(timeout=10)
    try:
        server = procs.start(
            ["-m", "bench.boxserver", "--port", str(http_port), *(["--etag"] if etag else [])],
            child_env(settings, url, prefix),
            stdout=subprocess.PIPE,
        )
        assert server.stdout is not None
        if (await asyncio.to_thread(server.stdout.readline)).strip() != b"ready":
            raise RuntimeError("the box-score server did not start")
        env = child_env(
            settings,
            url,
            prefix,
            TASKMGR_FEED_URL=f"http://127.0.0.1:{http_port}",
            TASKMGR_PROVIDER_URLS="",
            TASKMGR_METRICS_PORT=metrics_port,
            TASKMGR_CONCURRENCY=max(pollers, settings.concurrency),
            TASKMGR_POOL=POOL,
        )
        runner = procs.start(["-m", "taskmgr.cli", "runner", "--pool", POOL], env)

        async def metrics_up() -> bool:
            try:
                await scrape(client, metrics_port)
                return True
            except httpx.HTTPError:
                return False

        deadline = time.monotonic() + 30
        while not await metrics_up():
            if runner.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the runner did not start")
            await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await publish_orders(settings, topo, pollers, interval)
        _log(f"{pollers} start orders published in {time.monotonic() - t0:.1f} s; warming up")
        # Warm-up: all pollers active and polled once, first-poll events out, then one interval.
        warm_deadline = time.monotonic() + 90
        while True:
            m = await scrape(client, metrics_port)
            polled = sum(m["polls"].values())
            if m["active"] >= pollers and polled >= pollers and m["events"] >= 2 * pollers:
                break
            if runner.poll() is not None:
                raise RuntimeError(f"the runner exited with {runner.returncode}")
            if time.monotonic() > warm_deadline:
                _log(
                    f"warm-up incomplete after 90 s: active {m['active']:.0f}, polls {polled:.0f}, "
                    f"events {m['events']:.0f}; measuring anyway"
                )
                break
            await asyncio.sleep(0.5)
        warm_s = time.monotonic() - t0
        _log(f"warm after {warm_s:.1f} s; one more interval ({interval} s)")
        await asyncio.sleep(interval)
        # The window.
        s0 = (await client.get(f"http://127.0.0.1:{http_port}/_stats")).json()
        m0 = await scrape(client, metrics_port)
        c0, w0 = cpu_seconds(runner.pid), time.monotonic()
        await asyncio.sleep(seconds)
        s1 = (await client.get(f"http://127.0.0.1:{http_port}/_stats")).json()
        m1 = await scrape(client, metrics_port)
        c1, w1 = cpu_seconds(runner.pid), time.monotonic()
        window = w1 - w0
        requests = s1["requests"] - s0["requests"]
        p99 = hist_quantile(m0["drift"], m1["drift"], 0.99)
        p50 = hist_quantile(m0["drift"], m1["drift"], 0.50)
        polls_by = {k: round(v - m0["polls"].get(k, 0)) for k, v in m1["polls"].items()}
        result = {
            "pollers": pollers,
            "active_pollers": int(m1["active"]),
            "interval_s": interval,
            "etag": etag,
            "window_s": round(window, 1),
            "polls_per_s": round(requests / window, 1),
            "expected_polls_per_s": round(pollers / interval, 1),
            "not_modified_share": round((s1["not_modified"] - s0["not_modified"]) / max(requests, 1), 3),
            "runner_polls_by_outcome": polls_by,
            "tick_drift_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "tick_drift_p99_ms": None if p99 is None else round(p99 * 1000, 1),
            "cpu_percent": round(100 * (c1 - c0) / window, 1),
            "rss_mb": rss_mb(runner.pid),
            "body_bytes": s1["bytes"],
            "warmup_s": round(warm_s, 1),
        }
        _log(
            f"etag={etag}: {result['polls_per_s']} polls/s, drift p99 {result['tick_drift_p99_ms']} ms, "
            f"cpu {result['cpu_percent']}%, rss {result['rss_mb']} MB"
        )
        return result
    finally:
        await client.aclose()
        await procs.stop_all()
        try:
            await broker.delete_names(settings.amqp_url, topo, [POOL])
        except Exception as exc:
            _log(f"could not delete the queues of {prefix}: {exc!r}")


async def main(
    settings: Settings,
    pollers: int = 10000,
    interval: float = 10.0,
    seconds: float = 30.0,
    etag: str = "both",
    **_: Any,
) -> dict[str, Any]:
    modes = {"both": [True, False], "on": [True], "off": [False]}[etag]
    result: dict[str, Any] = {
        "benchmark": "runner",
        "where": "one runner subprocess (taskmgr.cli runner) <- start orders published by the bench process; "
        "box-score server subprocess (bench.boxserver, aiohttp) on 127.0.0.1; figures over the window",
        "machine": machine(),
    }
    runs = {}
    for on in modes:
        runs["with_etag" if on else "without_etag"] = await run_pollers(
            settings, pollers=pollers, interval=interval, seconds=seconds, etag=on
        )
    first = runs[next(iter(runs))]
    result.update(
        {k: first[k] for k in ("pollers", "polls_per_s", "tick_drift_p99_ms", "cpu_percent", "rss_mb")}
    )
    result["headline"] = next(iter(runs))
    result.update(runs)
    return result
