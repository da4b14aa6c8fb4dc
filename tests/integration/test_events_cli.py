"""`taskmgr events list` (the history), `events tail --from-start | --since | --offset`
(the stream) and `taskmgr games show` (issue #12, item 5); every bad input exits 2 with
one line saying what was wrong, and changes nothing."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy.ext.asyncio import AsyncEngine

from taskmgr import event_store
from taskmgr.broker import Publisher, Topology
from taskmgr.cli import main
from taskmgr.messages import Event
from taskmgr.settings import Settings
from tests.event_helpers import make_event, publish, stored_count, truncate_events

REF = {"provider": "nba", "league": "nba", "game_id": "0022400061", "home_team": "BOS", "away_team": "NYK"}


@pytest.fixture(autouse=True)
async def empty_history(database_url: str) -> None:
    await truncate_events(database_url)


class Ran:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def json(self) -> Any:
        assert self.code == 0, (self.code, self.stderr)
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"Ran({self.code}, {self.stdout[:300]!r}, {self.stderr[:300]!r})"


async def cli(settings: Settings, *args: str) -> Ran:
    """The CLI in a thread (it runs its own event loop), configured by the environment."""
    env = {
        "TASKMGR_DATABASE_URL": settings.database_url,
        "TASKMGR_AMQP_URL": settings.amqp_url,
        "TASKMGR_AMQP_PREFIX": settings.amqp_prefix,
        "TASKMGR_LOG_LEVEL": "WARNING",
    }
    result = await asyncio.to_thread(CliRunner().invoke, main, list(args), env=env)
    return Ran(result.exit_code, result.stdout, result.stderr)


def game_events(task: uuid.UUID, root: uuid.UUID, start: datetime) -> list[Event]:
    """A short game: started, three scores, two periods ended, final."""
    at = [start + timedelta(seconds=40 * i) for i in range(8)]

    def ev(n: int, kind: str, data: dict[str, Any]) -> Event:
        return make_event(n, task_id=task, root_task_id=root, kind=kind, at=at[n], data={**REF, **data})

    return [
        ev(0, "game.started", {"start_utc": start.isoformat()}),
        ev(1, "score.changed", {"home_score": 2, "away_score": 0, "period": 1}),
        ev(2, "score.changed", {"home_score": 2, "away_score": 3, "period": 1}),
        ev(3, "period.ended", {"period": 1, "home": 2, "away": 3}),
        ev(4, "score.changed", {"home_score": 4, "away_score": 3, "period": 2}),
        ev(5, "period.ended", {"period": 2, "home": 2, "away": 0}),
        ev(
            6,
            "game.final",
            {
                "home_score": 4,
                "away_score": 3,
                "periods": [{"period": 1, "home": 2, "away": 3}, {"period": 2, "home": 2, "away": 0}],
            },
        ),
    ]


@pytest.fixture
async def history(engine: AsyncEngine) -> dict[str, Any]:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    root, game_task, period_task = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    game = game_events(game_task, root, now - timedelta(minutes=10))
    follow_on = make_event(
        1,
        task_id=period_task,
        root_task_id=root,
        task_type="period_score",
        kind="period.score",
        at=now - timedelta(minutes=4),
        data={**REF, "period": 1, "home": 2, "away": 3, "available": True},
    )
    old = make_event(
        9, task_id=game_task, root_task_id=root, kind="game.started", at=now - timedelta(days=2), data=REF
    )
    async with engine.begin() as conn:
        await event_store.record_events(conn, [*game, follow_on, old])
    return {"now": now, "root": root, "task": game_task, "game": game, "follow_on": follow_on, "old": old}


async def test_events_list_by_task_root_and_game_with_since_and_kind(settings: Settings, history) -> None:  # type: ignore[no-untyped-def]
    task, root = str(history["task"]), str(history["root"])
    rows = (await cli(settings, "events", "list", "--task", task, "-o", "json")).json()
    assert [r["event_id"] for r in rows] == [str(e.event_id) for e in [history["old"], *history["game"]]]
    recent = (await cli(settings, "events", "list", "--task", task, "--since", "2h", "-o", "json")).json()
    assert len(recent) == len(history["game"])
    scores = (
        await cli(settings, "events", "list", "--task", task, "--kind", "score.changed", "-o", "json")
    ).json()
    assert [r["data"]["home_score"] for r in scores] == [2, 2, 4]
    tree = (await cli(settings, "events", "list", "--root", root, "--since", "1h", "-o", "yaml")).stdout
    assert {r["kind"] for r in yaml.safe_load(tree)} >= {"period.score", "game.final"}
    for game in ("nba:0022400061", "0022400061"):
        by_game = (
            await cli(settings, "events", "list", "--game", game, "--since", "1h", "-o", "json")
        ).json()
        assert len(by_game) == len(history["game"]) + 1  # the period_score task's event is the game's too
    since = (history["now"] - timedelta(minutes=7)).isoformat()
    late = (
        await cli(settings, "events", "list", "--game", "nba:0022400061", "--since", since, "-o", "json")
    ).json()
    assert [r["kind"] for r in late] == ["period.ended", "game.final", "period.score"]
    table = await cli(settings, "events", "list", "--task", task, "--kind", "game.final")
    assert table.code == 0 and "game.final" in table.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "{task}", "--since", "yesterday"], "--since: 'yesterday' is not a duration"),
        (["--task", "{task}", "--since", "-2h"], "is not a duration"),
        (["--task", "{task}", "--since", "0m"], "is not a duration"),
        (["--task", "{task}", "--since", "2026-11-24T19:00:00"], "needs a timezone"),
        (["--task", "{task}", "--since", "2026-13-45T19:00:00Z"], "is not an ISO-8601 time"),
        (["--task", "{task}", "--kind", "Score.Changed"], "--kind: 'Score.Changed' is not an event kind"),
        (["--task", "{task}", "--kind", "score..changed"], "is not an event kind"),
        (["--task", "not-a-uuid"], "--task: 'not-a-uuid' is not a UUID"),
        ([], "exactly one of --game, --task and --root"),
        (["--task", "{task}", "--root", "{task}"], "exactly one of"),
        (["--game", "fifa:1"], "unknown provider 'fifa'"),
        (["--game", "nba:"], "no game id"),
        (["--task", "{task}", "--limit", "0"], "--limit"),
    ],
)
async def test_events_list_bad_input_exits_2_with_the_reason(
    settings: Settings,
    engine: AsyncEngine,
    history,
    args: list[str],
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    before = await stored_count(engine)
    ran = await cli(settings, "events", "list", *[a.format(task=history["task"]) for a in args])
    assert ran.code == 2, ran
    assert message in ran.stderr, ran
    assert await stored_count(engine) == before


async def test_an_unknown_game_is_not_found_and_an_ambiguous_one_names_the_keys(
    settings: Settings,
    engine: AsyncEngine,
    history,  # type: ignore[no-untyped-def]
) -> None:
    missing = await cli(settings, "games", "show", "nba:404")
    assert missing.code == 1 and "no events of game 'nba:404'" in missing.stderr, missing
    twin = make_event(1, data={**REF, "provider": "espn", "league": "basketball/nba"})
    async with engine.begin() as conn:
        await event_store.record_events(conn, [twin])
    both = await cli(settings, "events", "list", "--game", "0022400061")
    assert both.code == 2 and "espn:0022400061, nba:0022400061" in both.stderr, both


async def test_games_show_scores_by_period_events_and_minutes(settings: Settings, history) -> None:  # type: ignore[no-untyped-def]
    doc = (await cli(settings, "games", "show", "nba:0022400061", "-o", "json")).json()
    assert (doc["game"], doc["home"], doc["away"], doc["status"]) == ("nba:0022400061", "BOS", "NYK", "final")
    assert doc["score"] == {"home": 4, "away": 3}
    assert doc["periods"] == [{"period": 1, "home": 2, "away": 3}, {"period": 2, "home": 2, "away": 0}]
    kinds = [e["kind"] for e in doc["events"]]
    assert kinds[0] == "game.started" and kinds[-2:] == ["game.final", "period.score"]
    assert kinds.count("score.changed") == 3
    times = [e["time"] for e in doc["events"]]
    assert times == sorted(times)
    minutes = doc["per_minute"]
    assert sum(m["events"] for m in minutes) == len(doc["events"])
    assert sum(m["score_changes"] for m in minutes) == 3
    assert all(datetime.fromisoformat(m["minute"]).second == 0 for m in minutes)
    table = await cli(settings, "games", "show", "0022400061")
    assert table.code == 0, table
    assert "NYK 3 at BOS 4" in table.stdout and "score by period" in table.stdout
    assert "events per minute" in table.stdout


# -- events tail from the stream -------------------------------------------------------


@pytest.fixture
async def streamed(settings: Settings) -> AsyncIterator[list[Event]]:
    task = uuid.uuid4()
    events = [
        make_event(i, task_id=task, data={**REF, "home_score": i, "away_score": 0, "period": 1})
        for i in range(6)
    ]
    others = [
        make_event(i, kind="period.ended", data={**REF, "period": i + 1, "home": 1, "away": 1})
        for i in range(2)
    ]
    async with Publisher(url=settings.amqp_url, topology=Topology.from_settings(settings)) as pub:
        await publish(pub, [*events[:3], *others, *events[3:]])
        yield events


async def test_events_tail_replays_the_stream_from_the_start_an_offset_or_a_time(
    settings: Settings, streamed: list[Event]
) -> None:
    args = ["events", "tail", "--routing-key", "live_game.score.*", "-o", "json", "--timeout", "5"]
    ran = await cli(settings, *args, "--from-start", "--count", "6")
    assert ran.code == 0, ran
    rows = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [r["event_id"] for r in rows] == [str(e.event_id) for e in streamed]
    assert [r["offset"] for r in rows] == [0, 1, 2, 5, 6, 7]
    from_offset = await cli(settings, *args, "--offset", "5", "--count", "3")
    assert [json.loads(line)["offset"] for line in from_offset.stdout.splitlines()] == [5, 6, 7]
    recent = await cli(
        settings, "events", "tail", "--since", "10m", "--count", "8", "-o", "json", "--timeout", "5"
    )
    assert len(recent.stdout.splitlines()) == 8, recent
    # Only what is there: it stops at its timeout with what it printed.
    short = await cli(settings, *args[:-1], "2", "--from-start")
    assert short.code == 0 and len(short.stdout.splitlines()) == 6, short


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "10x"], "--since: '10x' is not a duration"),
        (["--from-start", "--offset", "1"], "at most one of --from-start, --since and --offset"),
        (["--offset", "-1"], "--offset"),
        (["--routing-key", "live_game..score"], "--routing-key: 'live_game..score' is not one"),
        (["--from-start", "--routing-key", "live game"], "is not one"),
    ],
)
async def test_events_tail_bad_input_exits_2(settings: Settings, args: list[str], message: str) -> None:
    ran = await cli(settings, "events", "tail", *args, "--timeout", "1")
    assert ran.code == 2, ran
    assert message in ran.stderr, ran


async def test_events_tail_without_the_stream_fails_in_one_line(settings: Settings) -> None:
    ran = await cli(settings, "events", "tail", "--from-start", "--timeout", "2")
    assert ran.code == 1, ran
    assert ran.stderr.startswith("error: ") and "events stream" in ran.stderr, ran
