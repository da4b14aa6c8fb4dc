"""A simulated day through the whole event path (issue #12): runners emit, the recorder
stores each event once, the stream replays them, every event validates against its
kind's JSON Schema in docs/asyncapi.yaml, and the example scoreboard survives a SIGKILL
mid-game with no gap and no double count."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema
import pytest
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine

from task_types.feed import FeedConfig
from taskmgr import event_store
from taskmgr.broker import Publisher, Topology
from taskmgr.consumer import EventStream, Received
from taskmgr.messages import encode, kind_schema_name
from taskmgr.migrate import asyncpg_dsn
from taskmgr.settings import Settings
from tests.event_helpers import games_done, publish, repeat_of, simulated_day, truncate_events
from tests.helpers import amqp_as, wait_for

pytestmark = pytest.mark.usefixtures("sports_types")

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "asyncapi.yaml"


@pytest.fixture(autouse=True)
async def empty_history(database_url: str) -> None:
    await truncate_events(database_url)


def day(**kw: Any) -> FeedConfig:
    base = {"seed": 11, "games_per_provider": 1, "first_start_s": 1.0, "spread_s": 2.0, "period_s": 1.2}
    return FeedConfig(**{**base, "intermission_s": 0.3, **kw})


def kind_validators() -> dict[str, Any]:
    """A validator per schema of the document, its #/components refs resolved in it."""
    components = yaml.safe_load(DOC.read_text())["components"]
    out = {}
    for name, schema in components["schemas"].items():
        full = {**schema, "components": components}
        out[name] = jsonschema.validators.validator_for(full)(full)
    return out


async def test_every_event_of_a_simulated_day_is_stored_once_and_fits_its_schema(
    engine: AsyncEngine, settings: Settings
) -> None:
    async with simulated_day(engine, settings, day()) as d:
        await wait_for(lambda: games_done(engine), timeout=120, every=0.3, what="the day's games done")
        # Everything published is in the recorder's queue: wait until it is stored.
        async with EventStream(url=settings.amqp_url, prefix=settings.amqp_prefix, start="first") as stream:
            got = []
            while True:
                try:
                    async with asyncio.timeout(2.0):
                        got.append(await anext(aiter(stream)))
                except TimeoutError:
                    break
        ids = {r.event_id for r in got}
        await wait_for(lambda: _stored(engine, len(ids)), timeout=30, what="every event id stored")
    assert stream.counts.invalid == 0, stream.counts.invalid_reasons
    validators = kind_validators()
    kinds = Counter(r.routing_key for r in got)
    assert {
        "live_game.game.started",
        "live_game.score.changed",
        "live_game.period.ended",
        "live_game.game.final",
        "period_score.period.score",
        "schedule.schedule.synced",
    } <= set(kinds)
    for r in got:
        name = kind_schema_name(r.routing_key, r.event.version)
        assert name in validators, f"no schema for {name}"
        body = yaml.safe_load(encode(r.event))
        validators[name].validate(body)
        validators["Event"].validate(body)
        assert r.typed, r.routing_key
    async with engine.connect() as conn:
        rows, distinct = await event_store.event_counts(conn)
    assert rows == distinct == len(ids)
    assert d.recorder.counts.stored == len(ids)


async def _stored(engine: AsyncEngine, n: int) -> bool:
    async with engine.connect() as conn:
        rows, _ = await event_store.event_counts(conn)
    return rows >= n


# -- the example scoreboard --------------------------------------------------------------


async def _start_scoreboard(settings: Settings, database_url: str) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "SCOREBOARD_DATABASE_URL": database_url,
        "TASKMGR_AMQP_URL": amqp_as(settings.amqp_url, "taskmgr_consumer"),
        "TASKMGR_AMQP_PREFIX": settings.amqp_prefix,
        "SCOREBOARD_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.scoreboard", env=env, cwd=str(ROOT)
    )


async def _applied(database_url: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        exists = await conn.fetchval("select to_regclass('scoreboard') is not null")
        return int(await conn.fetchval("select coalesce(sum(events), 0) from scoreboard")) if exists else 0
    finally:
        await conn.close()


async def test_the_scoreboard_survives_sigkill_mid_game_with_no_gap_and_no_double_count(
    engine: AsyncEngine, settings: Settings, database_url: str
) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute("drop table if exists scoreboard, taskmgr_consumer_offsets")
    finally:
        await conn.close()
    board = await _start_scoreboard(settings, database_url)
    kills = 0
    try:
        async with simulated_day(engine, settings, day(period_s=2.5, spread_s=4.0)) as d:
            # Killed twice while games are under way, each time after it applied something new.
            for _ in range(2):
                before = await _applied(database_url)
                await wait_for(lambda b=before: _more(database_url, b + 3), timeout=60, what="applying")
                board.send_signal(signal.SIGKILL)
                await board.wait()
                kills += 1
                # While it is down, events go on, and some it applied come again (as a
                # second runner would publish them): its rebuilt window drops them.
                await _publish_repeats(settings, 5)
                await asyncio.sleep(1.0)
                board = await _start_scoreboard(settings, database_url)
            await wait_for(lambda: games_done(engine), timeout=150, every=0.3, what="games done")
            truth = {g["game_id"]: g for g in d.feed.truth()["games"]}
            async with engine.connect() as c:
                history = [e async for page in event_store.replay(c) for e in page]
            wanted = [
                e
                for e in history
                if e.task_type == "live_game" or e.routing_key == "stat_correction.score.corrected"
            ]
            await wait_for(lambda: _more(database_url, len(wanted)), timeout=60, what="scoreboard caught up")
            await asyncio.sleep(1.0)  # and nothing more comes
    finally:
        if board.returncode is None:
            board.send_signal(signal.SIGTERM)
            await asyncio.wait_for(board.wait(), 10)
    assert kills == 2
    assert board.returncode == 0, "stopped on SIGTERM"
    per_game: dict[str, list[event_store.StoredEvent]] = defaultdict(list)
    for e in wanted:
        per_game[f"{e.data['provider']}:{e.data['game_id']}"].append(e)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = {r["game_key"]: r for r in await conn.fetch("select * from scoreboard")}
    finally:
        await conn.close()
    assert set(rows) == set(per_game) and len(rows) == len(truth)
    for key, events in per_game.items():
        row = rows[key]
        # Every event of the game applied once: as many as the history holds, no more.
        assert row["events"] == len(events), key
        assert row["score_changes"] == sum(e.kind == "score.changed" for e in events), key
        g = truth[key.partition(":")[2]]
        assert (row["status"], row["home_score"], row["away_score"]) == (
            "final",
            g["final"]["home"],
            g["final"]["away"],
        )


async def _publish_repeats(settings: Settings, n: int) -> None:
    """Copies of the first `n` score changes of the stream, from another runner."""
    async with EventStream(
        url=settings.amqp_url, prefix=settings.amqp_prefix, start="first", routing_keys=["*.score.changed"]
    ) as stream:
        originals = [r.event async for r in _first(stream, n)]
    async with Publisher(
        url=settings.amqp_url, topology=Topology(settings.amqp_prefix), declare=False
    ) as pub:
        await publish(pub, [repeat_of(ev, runner="runner-copy") for ev in originals])


async def _first(stream: EventStream, n: int) -> AsyncIterator[Received]:
    got = 0
    async with asyncio.timeout(20):
        async for r in stream:
            yield r
            got += 1
            if got == n:
                return


async def _more(database_url: str, n: int) -> bool:
    return await _applied(database_url) >= n
