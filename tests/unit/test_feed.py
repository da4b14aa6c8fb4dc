"""The simulated feed over HTTP: real shapes at real paths, the accelerated clock, the
ground truth, faults and ETags. No test sleeps for simulated time to pass: the epoch is
put in the past (or games are moved) instead."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from task_types.feed import FeedConfig, RunningFeed, start_feed
from task_types.providers import GameStatus, get_provider
from taskmgr.handlers import ParseError, json_body

PROVIDERS = ["nba", "espn", "mlb", "nhl"]


def finished_config(**overrides: Any) -> FeedConfig:
    """Every game long over: the epoch is an hour ago and periods last a second."""
    epoch = datetime.now(UTC) - timedelta(hours=1)
    values: dict[str, Any] = {"seed": 11, "period_s": 1.0, "intermission_s": 0.2, "epoch": epoch}
    return FeedConfig(**{**values, **overrides})


@pytest.fixture
async def feed() -> AsyncIterator[RunningFeed]:
    running = await start_feed(finished_config())
    try:
        yield running
    finally:
        await running.close()


async def get_schedule(client: httpx.AsyncClient, feed: RunningFeed, provider: str) -> list[Any]:
    adapter = get_provider(provider)
    league = feed.day.of(provider)[0].league
    url = feed.base_urls()[provider] + adapter.schedule_path(feed.day.day, league)
    reply = await client.get(url)
    assert reply.status_code == 200, url
    return adapter.parse_schedule(json_body(reply, provider), league, day=feed.day.day)


async def get_game(client: httpx.AsyncClient, feed: RunningFeed, provider: str, game_id: str) -> Any:
    adapter = get_provider(provider)
    league = feed.day.of(provider)[0].league
    reply = await client.get(feed.base_urls()[provider] + adapter.game_path(game_id, league))
    assert reply.status_code == 200
    return adapter.parse_game(json_body(reply, provider), league)


async def set_faults(client: httpx.AsyncClient, feed: RunningFeed, **faults: Any) -> dict[str, Any]:
    reply = await client.post(f"{feed.url}/_faults", json=faults)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_schedule_and_games_parse_and_match_the_truth(feed: RunningFeed, provider: str) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        truth = (await client.get(f"{feed.url}/_truth")).json()
        games = await get_schedule(client, feed, provider)
        expected = [g for g in truth["games"] if g["provider"] == provider]
        assert [g.game_id for g in games] == [g["game_id"] for g in expected]
        assert len(games) == 2
        for listed, true in zip(games, expected, strict=True):
            # ESPN gives start times to the minute.
            start = datetime.fromisoformat(true["start_utc"])
            assert listed.start_utc == (start.replace(second=0) if provider == "espn" else start)
            game = await get_game(client, feed, provider, listed.game_id)
            assert game.status is GameStatus.FINAL
            assert (game.home_score, game.away_score) == (true["final"]["home"], true["final"]["away"])
            assert (game.home_team, game.away_team) == (true["home_team"], true["away_team"])
            assert true["score_changes"][-1]["home"] == true["final"]["home"]
            if provider != "nhl":
                assert [(p.home, p.away) for p in game.periods] == [
                    (p["home"], p["away"]) for p in true["periods"]
                ]


async def test_sizes_are_realistic(feed: RunningFeed) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        for provider in PROVIDERS:
            adapter = get_provider(provider)
            game = feed.day.of(provider)[0]
            for path in (
                adapter.schedule_path(feed.day.day, game.league),
                adapter.game_path(game.game_id, game.league),
            ):
                reply = await client.get(feed.base_urls()[provider] + path)
                assert 1_000 <= len(reply.content) <= 30_000, (provider, path, len(reply.content))


async def test_a_game_goes_scheduled_live_final() -> None:
    # Periods of a minute and a game 10 s away: moving its start (a runtime fault) puts
    # it before, inside and after the game without waiting.
    config = FeedConfig(seed=5, period_s=60.0, intermission_s=5.0, first_start_s=10.0, spread_s=0.0)
    running = await start_feed(config)
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            for provider in PROVIDERS:
                game_id = running.day.of(provider)[0].game_id
                await set_faults(client, running, moved={})
                assert (await get_game(client, running, provider, game_id)).status is GameStatus.SCHEDULED
                await set_faults(client, running, moved={game_id: -12.0})
                live = await get_game(client, running, provider, game_id)
                assert (live.status, live.period) == (GameStatus.LIVE, 1)
                await set_faults(client, running, moved={game_id: -5000.0})
                final = await get_game(client, running, provider, game_id)
                truth = (await client.get(f"{running.url}/_truth")).json()
                (true,) = (g for g in truth["games"] if g["game_id"] == game_id and g["provider"] == provider)
                assert final.status is GameStatus.FINAL and true["status"] == "final"
                assert (final.home_score, final.away_score) == (true["final"]["home"], true["final"]["away"])
    finally:
        await running.close()


async def test_postponed_and_moved_show_in_the_schedule(feed: RunningFeed) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        for provider in PROVIDERS:
            first, second = feed.day.of(provider)
            before = {g.game_id: g for g in await get_schedule(client, feed, provider)}
            await set_faults(client, feed, postponed=[first.game_id], moved={second.game_id: 3600.0})
            after = {g.game_id: g for g in await get_schedule(client, feed, provider)}
            assert after[first.game_id].status is GameStatus.POSTPONED
            assert (await get_game(client, feed, provider, first.game_id)).status is GameStatus.POSTPONED
            assert after[second.game_id].start_utc == before[second.game_id].start_utc + timedelta(hours=1)
            assert after[second.game_id].status is GameStatus.SCHEDULED
            await set_faults(client, feed, postponed=[], moved={})
        truth = (await client.get(f"{feed.url}/_truth")).json()
        assert not any(g["postponed"] for g in truth["games"])


async def test_faults(feed: RunningFeed) -> None:
    game = feed.day.of("nba")[0]
    url = feed.base_urls()["nba"] + get_provider("nba").game_path(game.game_id, "nba")
    async with httpx.AsyncClient(timeout=5) as client:
        await set_faults(client, feed, error_5xx=1.0)
        assert (await client.get(url)).status_code == 503
        # The truth is never faulty.
        assert (await client.get(f"{feed.url}/_truth")).status_code == 200

        await set_faults(client, feed, error_5xx=0.0, rate_limit_429=1.0)
        limited = await client.get(url)
        assert (limited.status_code, limited.headers["Retry-After"]) == (429, "1")

        await set_faults(client, feed, rate_limit_429=0.0, malformed=1.0)
        broken = await client.get(url)
        assert broken.status_code == 200
        with pytest.raises(ParseError, match=r"^nba: \$: body is not JSON"):
            json_body(broken, "nba")

        await set_faults(client, feed, malformed=0.0, slow=1.0, slow_s=0.3)
        began = time.monotonic()
        assert (await client.get(url)).status_code == 200
        assert time.monotonic() - began >= 0.3

        await set_faults(client, feed, slow=0.0, timeout=1.0, timeout_s=5.0)
        with pytest.raises(httpx.TimeoutException):
            await client.get(url, timeout=0.3)

        await set_faults(client, feed, timeout=0.0)
        assert (await client.get(url)).status_code == 200
        bad = await client.post(f"{feed.url}/_faults", json={"error_5xx": 2})
        assert bad.status_code == 400
        unknown = await client.post(f"{feed.url}/_faults", json={"lightning": 1})
        assert unknown.status_code == 400 and "lightning" in unknown.text


async def test_fault_rates_are_seeded() -> None:
    async def statuses() -> list[int]:
        running = await start_feed(finished_config())
        try:
            url = (
                running.base_urls()["mlb"] + "/api/v1/schedule?sportId=1&date=" + running.day.day.isoformat()
            )
            async with httpx.AsyncClient(timeout=5) as client:
                await set_faults(client, running, error_5xx=0.5)
                return [(await client.get(url)).status_code for _ in range(20)]
        finally:
            await running.close()

    first = await statuses()
    assert first == await statuses()
    assert {200, 503} == set(first)


async def test_etag_and_304(feed: RunningFeed) -> None:
    game = feed.day.of("nhl")[0]
    url = feed.base_urls()["nhl"] + get_provider("nhl").game_path(game.game_id, "nhl")
    async with httpx.AsyncClient(timeout=5) as client:
        first = await client.get(url)
        etag = first.headers["ETag"]
        assert etag.startswith('"')
        again = await client.get(url, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        other = await client.get(url, headers={"If-None-Match": '"something-else"'})
        assert other.status_code == 200 and other.headers["ETag"] == etag
        truth = await client.get(f"{feed.url}/_truth")
        assert "ETag" in truth.headers


async def test_unknown_game_and_other_days(feed: RunningFeed) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        missing = await client.get(feed.base_urls()["mlb"] + "/api/v1.1/game/1/feed/live")
        assert missing.status_code == 404
        tomorrow = feed.day.day + timedelta(days=1)
        for provider in ("espn", "mlb"):
            path = get_provider(provider).schedule_path(tomorrow, feed.day.of(provider)[0].league)
            reply = await client.get(feed.base_urls()[provider] + path)
            assert get_provider(provider).parse_schedule(reply.json(), provider) == []
        # The NHL week starting yesterday holds today's games on its second day.
        yesterday = feed.day.day - timedelta(days=1)
        reply = await client.get(
            feed.base_urls()["nhl"] + get_provider("nhl").schedule_path(yesterday, "nhl")
        )
        week = reply.json()["gameWeek"]
        assert [len(d["games"]) for d in week[:3]] == [0, 2, 0]


async def test_bomb_and_reversal_controls(feed: RunningFeed) -> None:
    """The faults the chaos day uses: one game answered with a gzip bomb, another whose
    first score is taken back (the truth shows the score going back)."""
    from task_types.feed import BOMB_BYTES

    nba, nhl = feed.day.of("nba")[0], feed.day.of("nhl")[0]
    async with httpx.AsyncClient(timeout=10) as client:
        await set_faults(client, feed, bombs=[nba.game_id], reversals=[nhl.game_id])
        adapter = get_provider("nba")
        url = feed.base_urls()["nba"] + adapter.game_path(nba.game_id, nba.league)
        async with client.stream("GET", url) as reply:
            assert reply.headers["content-encoding"] == "gzip"
            wire = int(reply.headers["content-length"])
            inflated = sum([len(chunk) async for chunk in reply.aiter_bytes()])
        assert wire < 200_000 and inflated == BOMB_BYTES
        truth = {g["game_id"]: g for g in (await client.get(f"{feed.url}/_truth")).json()["games"]}
        changes = [(c["home"], c["away"]) for c in truth[nhl.game_id]["score_changes"]]
        assert any(b[0] < a[0] or b[1] < a[1] for a, b in itertools.pairwise(changes)), changes
        game = await get_game(client, feed, "nhl", nhl.game_id)
        assert (game.home_score, game.away_score) == changes[-1]
        await set_faults(client, feed, bombs=[], reversals=[])
