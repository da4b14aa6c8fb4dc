"""The layers (tests/unit, tests/integration, tests/acceptance: each test is marked with
its folder's name), and the fixtures of the real PostgreSQL+TimescaleDB and RabbitMQ:
one database per test session, migrated once (on first use: never for unit tests) and
truncated between tests; each test gets its own RabbitMQ names."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.cluster import Cluster
from bench.cluster import unavailable as cluster_unavailable
from taskmgr import broker
from taskmgr.db import make_engine
from taskmgr.migrate import asyncpg_dsn, available, recreate_database
from taskmgr.service import TaskService
from taskmgr.settings import Settings

ADMIN_URL = os.environ.get("TASKMGR_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TEST_DB = os.environ.get("TASKMGR_TEST_DB", "taskmgr_test")
AMQP_URL = os.environ.get("TASKMGR_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
TABLES = (
    "task_events, task_services, task_state, tasks, task_types, runners, taskmgr_leader, schedule_seedings"
)
TESTS = Path(__file__).parent
LAYERS = ("unit", "integration", "acceptance")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cluster",
        action="store_true",
        help="run the tests marked `cluster` (they start the cluster harness: scripts/test --slow)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its layer, so `pytest -m unit` (or `-m "not acceptance"`)
    selects by layer. Tests marked `cluster` are skipped without --cluster."""
    skip = pytest.mark.skip(reason="starts the cluster harness: run with --cluster (scripts/test --slow)")
    for item in items:
        layer = item.path.relative_to(TESTS).parts[0]
        if layer in LAYERS:
            item.add_marker(layer)
        if "cluster" in item.keywords and not config.getoption("--cluster"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The cluster harness (scripts/cluster): started for the session, stopped and removed
    at its end unless it ran before the session (then left as it was)."""
    why = cluster_unavailable()
    if why:
        pytest.skip(why)
    c = Cluster()
    was_up = c.is_up()
    c.up()
    try:
        yield c
    finally:
        if not was_up:
            c.down()


def test_database_url() -> str:
    base = re.sub(r"/[^/]*$", f"/{TEST_DB}", ADMIN_URL)
    return base.replace("postgresql://", "postgresql+asyncpg://", 1)


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    url = test_database_url()
    await recreate_database(url)
    yield url


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(database_url, name="taskmgr-tests")
    yield eng
    await eng.dispose()


@pytest.fixture
async def clean(database_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(f"truncate {TABLES} cascade")
    finally:
        await conn.close()


@pytest.fixture
async def service(engine: AsyncEngine, clean: None) -> TaskService:
    return TaskService(engine=engine)


@pytest.fixture
async def topology() -> AsyncIterator[broker.Topology]:
    topo = broker.Topology(prefix=f"t{uuid.uuid4().hex[:12]}")
    yield topo
    await broker.delete_names(AMQP_URL, topo, pools=("default", "sports", "bench"))


@pytest.fixture
def settings(database_url: str, topology: broker.Topology) -> Settings:
    return Settings(
        database_url=database_url,
        amqp_url=AMQP_URL,
        amqp_prefix=topology.prefix,
        poll_interval=0.2,
        recovery_interval=0.3,
        heartbeat_interval=0.3,
        runner_dead_after=2.0,
        allowed_hosts="*.test,127.0.0.1",  # the fake APIs of the tests
    )


@pytest.fixture
async def sports_types(database_url: str, clean: None) -> None:
    """The built-in sports task types (migration 0002), back after the truncate."""
    [sports] = [m for m in available() if m.name == "0002_sports_types"]
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(sports.sql)
    finally:
        await conn.close()


@pytest.fixture
async def publisher(settings: Settings, topology: broker.Topology) -> AsyncIterator[broker.Publisher]:
    """The manager's side of the broker for a test: the topology declared, publishing."""
    async with broker.Publisher(url=settings.amqp_url, topology=topology) as pub:
        yield pub
