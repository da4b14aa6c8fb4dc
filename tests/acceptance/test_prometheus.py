"""A real Prometheus (Debian's /usr/bin/prometheus, its own storage in a temporary
directory, a free port on 127.0.0.1, a 1 s scrape) scrapes a live manager, runner and
recorder (`taskmgr` processes under their own roles and users) through a short simulated
day that the manager's own daily job seeds, with one poll in ten answered 5xx. Then every
query of the Grafana dashboard and every alerting rule is evaluated through Prometheus'
HTTP API. Prometheus is killed at the end."""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine

from task_types.feed import FeedConfig, start_feed
from task_types.feed.simulation import Faults
from taskmgr.models import State
from taskmgr.service import TaskService
from taskmgr.settings import Settings
from tests.acceptance.test_processes import Procs, env_of
from tests.helpers import ROOT, free_port, wait_for
from tests.unit.test_observability import PROMQL_KEYWORDS, panels_of

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean"), pytest.mark.timeout(300)]

OBS = ROOT / "docs" / "observability"
PROMETHEUS = "/usr/bin/prometheus"
# Grafana's $__rate_interval, for a 1 s scrape (Grafana: max(4 x scrape, interval + scrape)).
RATE_INTERVAL = "15s"
# Alert expressions that must be empty while the day goes well: a leader leads, the pool
# has its runner, the relay keeps up, the day is seeded, nothing is dead-lettered, no
# runner dies. (Lateness and the poll error ratio depend on this machine's load and on
# the injected 5xx: only their selectors are checked.)
QUIET_WHEN_HEALTHY = {
    "TaskmgrNoLeader",
    "TaskmgrPoolWithoutRunners",
    "TaskmgrLifecycleOutboxStale",
    "TaskmgrScheduleNotSeeded",
    "TaskmgrDeadLettersGrowing",
    "TaskmgrRunnersDying",
}


def selectors(expr: str) -> set[str]:
    """The vector selectors of a PromQL expression (metric name with its matchers, no
    range): identifiers that are not functions, keywords or grouping labels."""
    s = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", lambda m: " " * len(m[0]), expr
    )
    found = set()
    for m in re.finditer(r'(?<![\w.:$])([A-Za-z_:][\w:]*)\s*(\{(?:[^}"]|"(?:[^"\\]|\\.)*")*\})?', s):
        name, matchers = m[1], m[2] or ""
        if (not matchers and re.match(r"\s*\(", s[m.end() :])) or name.lower() in PROMQL_KEYWORDS:
            continue
        found.add(name + matchers)
    return found


def test_selectors_are_read_from_promql() -> None:
    assert selectors(
        'sum by (host) (rate(a_total{outcome!~"ok|x"}[5m])) / sum by (host) (rate(a_total[5m])) > 0.1'
    ) == {'a_total{outcome!~"ok|x"}', "a_total"}
    assert selectors("(sum(b) or vector(0)) < 1 and on (instance) (c == 1)") == {"b", "c"}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((OBS / "alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads((OBS / "grafana" / "dashboards" / "taskmgr.json").read_text())
    return [
        (p["title"], t["expr"].replace("$__rate_interval", RATE_INTERVAL))
        for p in panels_of(dash)
        for t in p["targets"]
    ]


def prometheus_config(tmp: Path, ports: dict[str, int]) -> Path:
    """docs/observability/prometheus.yml with each job's DNS discovery replaced by its one
    local process, a 1 s scrape and evaluation, the rules by absolute path, and no
    Alertmanager (none runs here)."""
    config = yaml.safe_load((OBS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(OBS / f) for f in config["rule_files"]]
    config.pop("alerting")
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def prometheus_dir() -> Iterator[Path]:
    if not Path(PROMETHEUS).exists():
        pytest.fail("Debian's prometheus is missing: run scripts/setup.sh")
    with tempfile.TemporaryDirectory(prefix="taskmgr-prometheus-") as d:
        yield Path(d)


@pytest.fixture
async def procs() -> AsyncIterator[Procs]:
    ps = Procs()
    yield ps
    await ps.close()


class Prom:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.AsyncClient(base_url=url, timeout=10)

    async def query(self, expr: str) -> list[Any]:
        """The instant vector of `expr` now; an evaluation error fails the test."""
        r = await self.client.get("/api/v1/query", params={"query": expr})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
        return list(body["data"]["result"])

    async def rules(self) -> list[dict[str, Any]]:
        r = await self.client.get("/api/v1/rules")
        return [rule for g in r.json()["data"]["groups"] for rule in g["rules"]]


async def start_prometheus(config: Path, data: Path) -> tuple[asyncio.subprocess.Process, Prom]:
    port = free_port()
    with open(data / "prometheus.log", "wb") as log:  # noqa: ASYNC230
        proc = await asyncio.create_subprocess_exec(
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={data / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    prom = Prom(f"http://127.0.0.1:{port}")

    async def ready() -> bool:
        assert proc.returncode is None, (data / "prometheus.log").read_text()
        try:
            return (await prom.client.get("/-/ready")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(ready, timeout=30, every=0.2, what="Prometheus ready")
    return proc, prom


async def test_prometheus_evaluates_the_dashboard_and_every_alert_on_a_live_day(
    engine: AsyncEngine,
    service: TaskService,
    settings: Settings,
    sports_types: None,
    procs: Procs,
    prometheus_dir: Path,
) -> None:
    """Criteria. Every dashboard query returns without error and with at least one
    series. Every rule is loaded and evaluated by Prometheus itself with health "ok"
    (no evaluation error), and its expression also evaluates without error through
    /api/v1/query. An alert expression is empty while its condition does not hold, so
    "with data" is judged on what it watches: every vector selector in it (metric name
    and matchers, as written) must return at least one series, that is the alert reads
    metrics that exist with the label values it filters on and would see the trouble it
    is for. And the alerts on conditions that this healthy day does not have
    (QUIET_WHEN_HEALTHY) must be empty, so they are not firing by construction either."""
    for name in ("live_game", "period_score", "stat_correction", "schedule"):
        await service.update_type(name, poll_interval_s=0.2, request_timeout_s=2.0)
    feed = await start_feed(
        FeedConfig(
            seed=5,
            games_per_provider=1,
            first_start_s=2,
            spread_s=2,
            period_s=1.5,
            intermission_s=0.3,
            providers=("nba", "nhl"),
            faults=Faults(error_5xx=0.1),
        )
    )
    ports = {"taskmgr-manager": free_port(), "taskmgr-runner": free_port(), "taskmgr-recorder": free_port()}
    # The manager seeds the day itself: its daily cron fired at 00:00 UTC, the feed's day.
    sports = {
        "TASKMGR_FEED_URL": feed.url,
        "TASKMGR_LEAGUES": "nba:nba,nhl:nhl",
        "TASKMGR_SCHEDULE_LEAD_S": "0",
        "TASKMGR_SCHEDULE_CRON": "0 0 * * *",
        "TASKMGR_SCHEDULE_TIMEZONE": "UTC",
    }
    prometheus: asyncio.subprocess.Process | None = None
    try:
        for cmd, role in (("manager", "taskmgr_manager"), ("recorder", "taskmgr_manager")):
            env = env_of(settings, role, TASKMGR_METRICS_PORT=ports[f"taskmgr-{cmd}"], **sports)
            await procs.start(env, cmd)
        port = ports["taskmgr-runner"]
        await procs.start(env_of(settings, "taskmgr_runner", TASKMGR_METRICS_PORT=port, **sports), "runner")
        config = prometheus_config(prometheus_dir, ports)
        prometheus, prom = await start_prometheus(config, prometheus_dir)

        async def games_finished() -> bool:
            games = await service.list_tasks(type="live_game", limit=100)
            return len(games) == 2 and all(g.state == State.FINISHED for g in games)

        await wait_for(games_finished, timeout=150, every=0.5, what="the day's games finished")

        # The scrapes after the day: every query has had samples by now, or never will.
        queries = dashboard_queries()
        watched = {r["alert"]: selectors(r["expr"]) for r in alert_rules()}

        async def missing() -> list[str]:
            out = [f"dashboard {t}: {e}" for t, e in queries if not await prom.query(e)]
            for alert, sels in watched.items():
                out += [f"alert {alert}: {s}" for s in sorted(sels) if not await prom.query(s)]
            return out

        try:
            await wait_for(lambda: _not(missing()), timeout=30, every=1, what="every query with data")
        except TimeoutError:
            pytest.fail("no data for:\n" + "\n".join(await missing()))

        for alert, sels in watched.items():
            assert sels, f"{alert} watches no metric"
        up = {s["metric"]["job"]: s["value"][1] for s in await prom.query("up")}
        assert up == {job: "1" for job in ports}, up
        assert float((await prom.query("sum(taskmgr_events_recorded_total)"))[0]["value"][1]) > 0

        # Prometheus' own evaluation of each rule, after a few evaluation rounds.
        async def evaluated() -> list[dict[str, Any]] | None:
            rules = await prom.rules()
            done = rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules)
            return rules if done else None

        rules = await wait_for(evaluated, timeout=15, every=0.5, what="the rules evaluated")
        assert {r["name"] for r in rules} == set(watched)
        for r in rules:
            assert r["health"] == "ok" and not r.get("lastError"), r
        results = {r["alert"]: await prom.query(r["expr"]) for r in alert_rules()}

        # The leader's readings are refreshed every 15 s (the first as it took the lead,
        # before the runner's first heartbeat): quiet within one more refresh.
        async def holding() -> dict[str, list[Any]]:
            found = {r["alert"]: await prom.query(r["expr"]) for r in alert_rules()}
            return {a: v for a, v in found.items() if a in QUIET_WHEN_HEALTHY and v}

        try:
            await wait_for(lambda: _not(holding()), timeout=40, every=1, what="the health alerts quiet")
        except TimeoutError:
            pytest.fail(f"alerts holding on a healthy day: {await holding()}")
        assert set(results) == set(watched)
    finally:
        if prometheus is not None:
            prometheus.kill()
            await asyncio.wait_for(prometheus.wait(), 10)
            await prom.client.aclose()
        await feed.close()


async def _not(coro: Any) -> bool:
    return not await coro
