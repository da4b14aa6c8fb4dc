"""The sports handlers, driven by responses built from recorded fixtures and from the
simulated feed's bodies, through a game from before the start to the final."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from task_types.feed import Faults, FeedConfig, SimulatedDay
from task_types.game import LiveGameHandler, game_url_template
from task_types.noop import NoopHandler
from task_types.period_score import PeriodScoreHandler
from task_types.schedule import ScheduleHandler
from task_types.stat_correction import StatCorrectionHandler
from taskmgr.handlers import HandlerError, Outcome, ParseError, PollContext, Registry
from tests.helpers import FIXTURES

EPOCH = datetime(2026, 3, 1, 18, 0, tzinfo=UTC)
TASK = uuid.UUID(int=1)


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def ctx(
    payload: dict[str, Any], state: dict[str, Any] | None = None, now: datetime = EPOCH, interval: float = 2.0
) -> PollContext:
    return PollContext(
        task_id=TASK,
        root_task_id=TASK,
        task_type="live_game",
        attempt=1,
        payload=payload,
        state=state or {},
        url="http://feed.invalid/",
        now=now,
        interval_s=interval,
    )


def response(body: Any) -> httpx.Response:
    return httpx.Response(200, json=body)


def sim(**overrides: Any) -> SimulatedDay:
    config = FeedConfig(
        seed=7,
        games_per_provider=1,
        first_start_s=1.0,
        spread_s=0.0,
        period_s=1.0,
        intermission_s=0.5,
        **overrides,
    )
    return SimulatedDay(config, EPOCH)


def run_game(
    day: SimulatedDay, provider: str, step_s: float, max_polls: int = 500
) -> tuple[list[Outcome], dict[str, Any]]:
    """Poll one simulated game every step_s until the handler says done."""
    game = day.of(provider)[0]
    payload = {
        "provider": provider,
        "league": game.league,
        "game_id": game.game_id,
        "stat_correction_delay_s": 30,
    }
    handler = LiveGameHandler()
    state: dict[str, Any] = {}
    outcomes = []
    at = EPOCH
    for _ in range(max_polls):
        outcome = handler.handle(ctx(payload, state, at), response(day.game_body(provider, game, at)))
        outcomes.append(outcome)
        state = dict(outcome.state)
        json.dumps(state)  # the carried state must be JSON-able
        if outcome.done:
            break
        at += timedelta(seconds=step_s)
    (truth,) = (g for g in day.truth(at)["games"] if g["game_id"] == game.game_id)
    return outcomes, truth


def names_keys(outcomes: list[Outcome]) -> list[tuple[str, str]]:
    return [(e.name, e.key) for o in outcomes for e in o.events]


@pytest.mark.parametrize("provider", ["nba", "espn", "mlb", "nhl"])
def test_a_whole_game(provider: str) -> None:
    day = sim()
    outcomes, truth = run_game(day, provider, step_s=0.1)
    events = [e for o in outcomes for e in o.events]
    names = [e.name for e in events]
    assert outcomes[-1].done and not any(o.done for o in outcomes[:-1])
    assert names[0] == "game.started" and names.count("game.started") == 1
    assert names[-1] == "game.final" and names.count("game.final") == 1
    final = events[-1].data
    assert (final["home_score"], final["away_score"]) == (truth["final"]["home"], truth["final"]["away"])
    # Every score the feed went through was seen (polls are faster than scoring here,
    # except that two plays can land in one poll interval).
    changes = [e for e in events if e.name == "score.changed"]
    assert (changes[-1].data["home_score"], changes[-1].data["away_score"]) == (
        final["home_score"],
        final["away_score"],
    )
    assert len(changes) >= len(truth["score_changes"]) // 2
    keys = [(e.name, e.key) for e in events]
    assert len(keys) == len(set(keys)), "an observation was emitted twice"
    periods = len(truth["periods"])
    ended = [e.key for e in events if e.name == "period.ended"]
    assert ended == [f"p{n}" for n in range(1, periods + 1)]
    follow = [f for o in outcomes for f in o.follow_ons]
    assert [f.dedup_key for f in follow] == [f"period-{n}" for n in range(1, periods + 1)] + [
        "stat-correction"
    ]
    correction = follow[-1]
    assert correction.type == "stat_correction" and correction.delay_s == 30
    assert (correction.payload["home_score"], correction.payload["away_score"]) == (
        truth["final"]["home"],
        truth["final"]["away"],
    )
    if provider != "nhl":  # the NHL box score has no line score
        by_period = {e.key: e.data for e in events if e.name == "period.ended"}
        for line in truth["periods"]:
            assert (by_period[f"p{line['period']}"]["home"], by_period[f"p{line['period']}"]["away"]) == (
                line["home"],
                line["away"],
            )


@pytest.mark.parametrize("provider", ["nba", "espn", "mlb", "nhl"])
def test_two_pollers_agree_on_keys(provider: str) -> None:
    """A poller that sees fewer snapshots emits a subset of the same keys: the keys name
    observations, not polls."""
    day = sim()
    fast, _ = run_game(day, provider, step_s=0.1)
    slow, _ = run_game(day, provider, step_s=0.3)
    fast_keys, slow_keys = set(names_keys(fast)), set(names_keys(slow))
    assert slow_keys <= fast_keys
    for name in ("game.started", "period.ended", "game.final"):
        assert {k for k in fast_keys if k[0] == name} == {k for k in slow_keys if k[0] == name}


def test_replay_emits_nothing_new() -> None:
    body = load("nba/dliu713_nba-scores-website__todaysScoreboard_00.json")
    game = body["scoreboard"]["games"][0]
    box = {"meta": body["meta"], "game": game}
    payload = {"provider": "nba", "league": "nba", "game_id": game["gameId"]}
    first = LiveGameHandler().handle(ctx(payload), response(box))
    # Already live on the first poll: started, the current score once, and Q1 is over.
    assert names_keys([first]) == [
        ("game.started", "started"),
        ("score.changed", "p2:30-39"),
        ("period.ended", "p1"),
    ]
    assert first.events[2].data["home"] == 29 and first.events[2].data["away"] == 20
    assert [f.dedup_key for f in first.follow_ons] == ["period-1"]
    assert first.next_interval_s == 2.0 and not first.done
    again = LiveGameHandler().handle(ctx(payload, dict(first.state)), response(box))
    assert again.events == [] and again.follow_ons == []


def test_final_fixture_on_first_poll() -> None:
    payload = {"provider": "nba", "league": "nba", "game_id": "0042200123"}
    outcome = LiveGameHandler().handle(
        ctx(payload), response(load("nba/dliu713_nba-scores-website__boxscore_0042200123.json"))
    )
    assert outcome.done
    assert [n for n, _ in names_keys([outcome])] == [
        "game.started",
        "score.changed",
        "period.ended",
        "period.ended",
        "period.ended",
        "period.ended",
        "game.final",
    ]
    assert outcome.events[-1].data["home_score"] == 97 and outcome.events[-1].data["away_score"] == 102


def test_postponed_and_cancelled_end_the_task() -> None:
    body = load("nhl/StefanOOE_mcp-nhl__boxscore_2024020600_trimmed.json")
    payload = {"provider": "nhl", "league": "nhl", "game_id": "2024020600"}
    body.update(gameState="FUT", gameScheduleState="PPD")
    outcome = LiveGameHandler().handle(ctx(payload), response(body))
    assert outcome.done and names_keys([outcome]) == [("game.postponed", "postponed")]
    body["gameScheduleState"] = "CNCL"
    outcome = LiveGameHandler().handle(ctx(payload), response(body))
    assert outcome.done and names_keys([outcome]) == [("game.cancelled", "cancelled")]


def test_postponed_in_the_simulated_feed() -> None:
    day = sim()
    game = day.of("mlb")[0]
    day.faults = Faults(postponed=[game.game_id])
    payload = {"provider": "mlb", "league": "mlb", "game_id": game.game_id}
    outcome = LiveGameHandler().handle(ctx(payload), response(day.game_body("mlb", game, EPOCH)))
    assert outcome.done and names_keys([outcome]) == [("game.postponed", "postponed")]


def test_interval_adapts() -> None:
    day = sim()
    game = day.of("nhl")[0]
    payload = {"provider": "nhl", "league": "nhl", "game_id": game.game_id}
    handler = LiveGameHandler()

    def interval(at: datetime) -> float | None:
        return handler.handle(
            ctx(payload, now=at, interval=2.0), response(day.game_body("nhl", game, at))
        ).next_interval_s

    start = day.start(game)
    assert interval(start - timedelta(hours=1)) == 6.0  # before the start: 3x
    assert interval(start - timedelta(seconds=3)) == 3.0  # ...but not past the start
    assert interval(start + timedelta(seconds=0.2)) == 2.0  # live
    assert interval(start + timedelta(seconds=1.2)) == 6.0  # first intermission
    assert interval(start + timedelta(seconds=2 * 1.5 + 0.97)) == 1.0  # the last minute of the 3rd


def test_bad_payload_and_body() -> None:
    handler = LiveGameHandler()
    with pytest.raises(HandlerError, match="known providers"):
        handler.handle(ctx({"provider": "xfl", "game_id": "1"}), response({}))
    with pytest.raises(HandlerError, match="game_id"):
        handler.handle(ctx({"provider": "nba"}), response({}))
    with pytest.raises(ParseError, match=r"^nba: \$: body is not JSON"):
        handler.handle(ctx({"provider": "nba", "game_id": "1"}), httpx.Response(200, text='{"game": {'))
    with pytest.raises(ParseError, match=r"^nba: \$\.game: missing"):
        handler.handle(ctx({"provider": "nba", "game_id": "1"}), response({"meta": {}}))


def test_urls() -> None:
    bases = {"nba": "http://127.0.0.1:9/nba", "espn": "http://127.0.0.1:9/espn"}
    handler = LiveGameHandler(bases)
    nba = {"provider": "nba", "league": "nba", "game_id": "0042200123"}
    assert game_url_template("nba") == "{base}/static/json/liveData/boxscore/boxscore_{game_id}.json"
    assert handler.url(game_url_template("nba"), nba) == (
        "http://127.0.0.1:9/nba/static/json/liveData/boxscore/boxscore_0042200123.json"
    )
    espn = {"provider": "espn", "league": "nba", "game_id": "401869412"}
    assert handler.url("{base}{game_path}", espn) == (
        "http://127.0.0.1:9/espn/apis/site/v2/sports/basketball/nba/summary?event=401869412"
    )
    mlb = {"provider": "mlb", "league": "mlb", "game_id": "744914"}
    assert (
        LiveGameHandler({}).url("{base}{game_path}", mlb) == "https://statsapi.mlb.com/api/v1.1/game/744914/feed/live"
    )
    schedule = {"provider": "espn", "league": "basketball/nba", "date": "2026-05-02"}
    assert ScheduleHandler(bases).url("{base}{schedule_path}", schedule) == (
        "http://127.0.0.1:9/espn/apis/site/v2/sports/basketball/nba/scoreboard?dates=20260502"
    )


def test_registered() -> None:
    registry = Registry.default()  # through the taskmgr.handlers entry points
    for name in ("noop", "live_game", "period_score", "stat_correction", "schedule"):
        assert registry.get(name).name == name


def test_noop_finishes_on_its_poll_with_the_follow_on_its_payload_names() -> None:
    plain = NoopHandler().handle(ctx({"i": 1}), response({}))
    assert plain.done and not plain.follow_ons and names_keys([plain]) == [("done", "done")]
    then = {"type": "bench_life_next", "payload": {"i": "f1"}}
    (follow_on,) = NoopHandler().handle(ctx({"i": 1, "then": then}), response({})).follow_ons
    assert (follow_on.type, dict(follow_on.payload), follow_on.dedup_key) == (
        "bench_life_next",
        {"i": "f1"},
        "then",
    )
    with pytest.raises(HandlerError, match="then"):
        NoopHandler().handle(ctx({"then": "bench_life_next"}), response({}))


# -- period_score -----------------------------------------------------------------------


def test_period_score() -> None:
    body = load("nba/dliu713_nba-scores-website__boxscore_0042200123.json")
    payload = {"provider": "nba", "league": "nba", "game_id": "0042200123", "period": 2}
    outcome = PeriodScoreHandler().handle(ctx(payload), response(body))
    assert outcome.done
    (event,) = outcome.events
    assert (event.name, event.key) == ("period.score", "p2")
    assert (event.data["home"], event.data["away"], event.data["available"]) == (19, 26, True)
    nhl = {"provider": "nhl", "league": "nhl", "game_id": "2024020600", "period": 1}
    outcome = PeriodScoreHandler().handle(
        ctx(nhl), response(load("nhl/StefanOOE_mcp-nhl__boxscore_2024020600_trimmed.json"))
    )
    assert outcome.events[0].data["available"] is False


# -- stat_correction --------------------------------------------------------------------


def test_stat_correction() -> None:
    body = load("mlb/DarkSideOfTheMat_mlb-statsapi-pydantic__livefeed.json")
    payload = {"provider": "mlb", "league": "mlb", "game_id": "744914", "home_score": 1, "away_score": 3}
    outcome = StatCorrectionHandler().handle(ctx(payload), response(body))
    assert outcome.done and names_keys([outcome]) == [("stats.checked", "checked")]
    assert outcome.events[0].data["changed"] is False
    corrected = StatCorrectionHandler().handle(ctx({**payload, "away_score": 4}), response(body))
    assert names_keys([corrected]) == [("stats.checked", "checked"), ("score.corrected", "3-1")]
    assert corrected.events[0].data["changed"] is True
    with pytest.raises(HandlerError, match="home_score"):
        StatCorrectionHandler().handle(ctx({"provider": "mlb", "game_id": "744914"}), response(body))


# -- schedule ---------------------------------------------------------------------------


def confirmed(payload: dict[str, Any], body: Any) -> Outcome:
    """A schedule listing is synced when a second fetch shows the same: two polls."""
    first = ScheduleHandler().handle(ctx(payload), response(body))
    assert first.sync is None and not first.done and first.events == []
    assert first.refetch, "the confirming fetch must get the whole body, not a 304"
    return ScheduleHandler().handle(ctx(payload, dict(first.state)), response(body))


def test_a_listing_is_synced_only_when_a_second_fetch_agrees() -> None:
    """An empty (or shrunken) response, a provider's glitch, would cancel every game in
    scope: it must be confirmed by the next fetch, and the full listing that follows it
    is what gets synced."""
    body = load("nhl/austinegri_NhlGamesTodayLambda__scheduleResponseWithGames.json")
    payload = {"provider": "nhl", "league": "nhl", "date": "2023-12-17", "lead_s": 300}
    empty = copy.deepcopy(body)
    for week_day in empty["gameWeek"]:
        week_day["games"] = []
    handler = ScheduleHandler()
    glitch = handler.handle(ctx(payload), response(empty))
    assert glitch.sync is None and not glitch.done
    recovered = handler.handle(ctx(payload, dict(glitch.state)), response(body))
    assert recovered.sync is None, "a different listing starts the confirmation again"
    agreed = handler.handle(ctx(payload, dict(recovered.state)), response(body))
    assert agreed.done and agreed.sync is not None and len(agreed.sync.follow_ons) == 5


def test_schedule_from_recorded_nhl_week() -> None:
    body = load("nhl/austinegri_NhlGamesTodayLambda__scheduleResponseWithGames.json")
    payload = {"provider": "nhl", "league": "nhl", "date": "2023-12-17", "lead_s": 300}
    outcome = confirmed(payload, body)
    assert outcome.done and outcome.sync is not None
    assert outcome.sync.scope == "nhl:nhl:2023-12-17"
    follow = outcome.sync.follow_ons
    assert len(follow) == 5  # that day only, not the whole week
    assert follow[0].type == "live_game" and follow[0].dedup_key == "2023020474"
    assert follow[0].payload == {"provider": "nhl", "league": "nhl", "game_id": "2023020474"}
    assert follow[0].due_at == datetime(2023, 12, 17, 19, 55, tzinfo=UTC)
    (event,) = outcome.events
    assert event.name == "schedule.synced" and event.key.startswith("2023-12-17:")
    assert event.data["games"] == 5 and event.data["tasks"] == 5


@pytest.mark.parametrize("provider", ["nba", "espn", "mlb", "nhl"])
def test_schedule_from_the_feed_drops_postponed(provider: str) -> None:
    day = SimulatedDay(FeedConfig(seed=2, games_per_provider=3, day=date(2026, 3, 1)), EPOCH)
    games = day.of(provider)
    payload = {
        "provider": provider,
        "league": games[0].league,
        "date": "2026-03-01",
        "game_type": "live_game",
    }
    before = confirmed(payload, day.schedule_body(provider, EPOCH))
    assert before.sync is not None
    assert [f.dedup_key for f in before.sync.follow_ons] == [g.game_id for g in games]
    # ESPN lists start times to the minute.
    precision = {"second": 0} if provider == "espn" else {}
    assert [f.due_at for f in before.sync.follow_ons] == [day.start(g).replace(**precision) for g in games]
    again = confirmed(payload, day.schedule_body(provider, EPOCH))
    assert again.events[0].key == before.events[0].key  # same listing, same key

    day.faults = Faults(postponed=[games[1].game_id], moved={games[2].game_id: 600})
    after = confirmed(payload, day.schedule_body(provider, EPOCH))
    assert after.sync is not None
    assert [f.dedup_key for f in after.sync.follow_ons] == [games[0].game_id, games[2].game_id]
    moved = before.sync.follow_ons[2].due_at + timedelta(seconds=600)
    assert after.sync.follow_ons[1].due_at == moved == day.start(games[2]).replace(**precision)
    assert after.events[0].key != before.events[0].key
    assert after.events[0].data["by_status"]["postponed"] == 1


@pytest.mark.parametrize("provider", ["nba", "espn", "mlb", "nhl"])
def test_a_score_taken_back_is_a_new_event_with_the_corrected_score(provider: str) -> None:
    """The feed takes a game's first score back later in its period: the poller emits
    the corrected score as an event of its own (before, it got the id of the first
    observation of that score, and consumers that drop repeats dropped the correction),
    and the last score event is the true final."""
    day = sim()
    game = day.of(provider)[0]
    day.faults = day.faults.updated({"reversals": [game.game_id]})
    outcomes, truth = run_game(day, provider, step_s=0.01, max_polls=5000)
    scores = [
        (e.event_id(TASK), (e.data["away_score"], e.data["home_score"]))
        for o in outcomes
        for e in o.events
        if e.name == "score.changed"
    ]
    seen = [s for _, s in scores]
    went_back = [i for i in range(1, len(seen)) if seen[i][0] < seen[i - 1][0] or seen[i][1] < seen[i - 1][1]]
    assert went_back, f"the reversal was observed: {seen}"
    reverted = seen[went_back[0]]
    # Every score event has an id of its own, a score that came back included.
    assert len({i for i, _ in scores}) == len(scores), scores
    if provider == "nhl":  # one goal taken back: the score is one seen before
        assert seen.count(reverted) >= 2
    assert seen[-1] == (truth["final"]["away"], truth["final"]["home"])
    changes = [(c["away"], c["home"]) for c in truth["score_changes"]]
    assert reverted in changes[changes.index(seen[went_back[0] - 1]) + 1 :], "the truth shows it too"


def test_the_same_observation_polled_twice_has_one_id() -> None:
    day = sim()
    game = day.of("nhl")[0]
    day.faults = day.faults.updated({"reversals": [game.game_id]})
    first, _ = run_game(day, "nhl", step_s=0.05)
    again, _ = run_game(day, "nhl", step_s=0.05)
    ids = lambda os: [e.event_id(TASK) for o in os for e in o.events]  # noqa: E731
    assert ids(first) == ids(again)
