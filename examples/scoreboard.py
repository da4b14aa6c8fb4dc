"""A live scoreboard: a downstream service that keeps every game's score, period by
period, in a table of its own, from the events stream.

    python -m examples.scoreboard --database-url postgresql+asyncpg://.../scores \\
        --amqp-url amqp://taskmgr_consumer:...@host/ --prefix taskmgr

It reads with the consumer kit (taskmgr.consumer.EventStream) and applies each event in
one transaction together with the stream offset it came from (SqlOffsets.save_in): a
SIGKILL at any point leaves the table and the offset in step, so a restart goes on from
the next event, with no gap and nothing applied twice. Repeats of an event (two
runners, a new attempt) are dropped by id within the kit's window, which a restart
rebuilds from the stream. It needs only the taskmgr_consumer RabbitMQ user (read the
stream) and a database of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from task_types.events import (
    GameCancelled,
    GameFinal,
    GamePostponed,
    GameRef,
    PeriodEnded,
    ScoreChanged,
    ScoreCorrected,
)
from taskmgr.consumer import EventStream, Received, SqlOffsets

log = logging.getLogger("scoreboard")

ROUTING_KEYS = ("live_game.#", "stat_correction.score.corrected")

SCHEMA = [
    """create table if not exists scoreboard (
        game_key      text primary key,
        provider      text not null,
        league        text not null,
        game_id       text not null,
        home_team     text not null,
        away_team     text not null,
        status        text not null default 'live',
        home_score    integer,
        away_score    integer,
        period        integer not null default 0,
        periods       jsonb not null default '{}'::jsonb,
        score_changes integer not null default 0,
        events        integer not null default 0,
        updated_at    timestamptz not null default now()
    )""",
    "comment on column scoreboard.periods is 'period number -> {home, away}, as each period ended'",
    "comment on column scoreboard.score_changes is 'score.changed events applied (each event id once)'",
    "comment on column scoreboard.events is 'events applied to this game (each event id once)'",
]

_UPSERT = text(
    """insert into scoreboard (game_key, provider, league, game_id, home_team, away_team)
    values (:key, :provider, :league, :game_id, :home, :away)
    on conflict (game_key) do nothing"""
)


class Scoreboard:
    def __init__(self, *, engine: AsyncEngine, amqp_url: str, prefix: str, name: str = "scoreboard") -> None:
        self.engine = engine
        self.amqp_url = amqp_url
        self.prefix = prefix
        self.name = name
        self.offsets = SqlOffsets(engine, name)
        self.applied = 0

    async def setup(self) -> None:
        async with self.engine.begin() as conn:
            for statement in SCHEMA:
                await conn.execute(text(statement))
        await self.offsets.setup()

    async def run(self, stop: asyncio.Event) -> None:
        await self.setup()
        stream = EventStream(
            url=self.amqp_url,
            prefix=self.prefix,
            name=self.name,
            routing_keys=ROUTING_KEYS,
            start="first",  # the first run reads everything the stream still holds
            offsets=self.offsets,
            commit_offsets=False,  # each handler commits its offset with its writes
        )
        async with stream:
            log.info("scoreboard reading %s from offset %s", stream.stream, stream.offset)
            stopping = asyncio.create_task(stop.wait())
            iterator = aiter(stream)
            while not stop.is_set():
                nxt = asyncio.ensure_future(anext(iterator))
                await asyncio.wait([nxt, stopping], return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    break
                await self.apply(nxt.result())
            stopping.cancel()

    async def apply(self, received: Received) -> None:
        """One event and its offset, in one transaction."""
        async with self.engine.begin() as conn:
            if isinstance(received.data, GameRef):
                await _apply(conn, received.data)
            await self.offsets.save_in(conn, received.offset)
        self.applied += 1


_SQL = {
    "score": text(
        "update scoreboard set home_score = :home_score, away_score = :away_score, period = :period,"
        " score_changes = score_changes + 1, events = events + 1, updated_at = now() where game_key = :key"
    ),
    "period": text(
        "update scoreboard set periods = periods || cast(:line as jsonb), events = events + 1,"
        " updated_at = now() where game_key = :key"
    ),
    "final": text(
        "update scoreboard set status = 'final', home_score = :home_score, away_score = :away_score,"
        " periods = cast(:periods as jsonb), events = events + 1, updated_at = now() where game_key = :key"
    ),
    "corrected": text(
        "update scoreboard set home_score = :home_score, away_score = :away_score, events = events + 1,"
        " updated_at = now() where game_key = :key"
    ),
    "status": text(
        "update scoreboard set status = :status, events = events + 1, updated_at = now()"
        " where game_key = :key"
    ),
    "seen": text("update scoreboard set events = events + 1, updated_at = now() where game_key = :key"),
}


async def _apply(conn: AsyncConnection, data: GameRef) -> None:
    key = data.game_key
    game = {
        "key": key,
        "provider": data.provider,
        "league": data.league,
        "game_id": data.game_id,
        "home": data.home_team,
        "away": data.away_team,
    }
    await conn.execute(_UPSERT, game)
    statement, params = _update(data)
    await conn.execute(_SQL[statement], {**params, "key": key})


def _update(data: GameRef) -> tuple[str, dict[str, Any]]:
    match data:
        case ScoreChanged():
            return "score", {
                "home_score": data.home_score,
                "away_score": data.away_score,
                "period": data.period,
            }
        case PeriodEnded():
            return "period", {"line": json.dumps({str(data.period): {"home": data.home, "away": data.away}})}
        case GameFinal():
            periods = {str(p.period): {"home": p.home, "away": p.away} for p in data.periods}
            scores = {"home_score": data.home_score, "away_score": data.away_score}
            return "final", {**scores, "periods": json.dumps(periods)}
        case ScoreCorrected():
            return "corrected", {"home_score": data.after.home_score, "away_score": data.after.away_score}
        case GamePostponed():
            return "status", {"status": "postponed"}
        case GameCancelled():
            return "status", {"status": "cancelled"}
    return "seen", {}  # game.started, and kinds a newer runner may add


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("SCOREBOARD_DATABASE_URL"))
    parser.add_argument(
        "--amqp-url", default=os.environ.get("TASKMGR_AMQP_URL", "amqp://guest:guest@127.0.0.1/")
    )
    parser.add_argument("--prefix", default=os.environ.get("TASKMGR_AMQP_PREFIX", "taskmgr"))
    parser.add_argument("--name", default=os.environ.get("SCOREBOARD_NAME", "scoreboard"))
    args = parser.parse_args()
    if not args.database_url:
        parser.error("--database-url (or SCOREBOARD_DATABASE_URL) is required")
    logging.basicConfig(
        level=os.environ.get("SCOREBOARD_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s"
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        engine = create_async_engine(args.database_url, pool_size=2)
        try:
            await Scoreboard(engine=engine, amqp_url=args.amqp_url, prefix=args.prefix, name=args.name).run(
                stop
            )
        finally:
            await engine.dispose()

    asyncio.run(run())


if __name__ == "__main__":
    main()
