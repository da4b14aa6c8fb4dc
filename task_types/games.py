"""Games in the event history: a game's events, its score by period, its events per
minute. The sports side of the history (the engine's emitted_events knows no games; the
game_key column comes from the events' data, task_types/sql/0013)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from task_types.providers import PROVIDERS
from taskmgr.errors import InvalidInput, NotFound
from taskmgr.event_store import DEFAULT_LIMIT, StoredEvent, event_from_row
from taskmgr.queries import QueryFile
from taskmgr.store import Conn

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_QUERIES = QueryFile(lambda: resources.files("task_types") / "sql" / "game_queries.sql")
_run = _QUERIES.run


class GameNotFound(NotFound):
    pass


def candidate_keys(game: str) -> list[str]:
    """`provider:game_id` as given, or a bare game id under every provider. Raises
    InvalidInput for an unknown provider or an empty id."""
    provider, sep, game_id = game.partition(":")
    if not sep:
        if not game.strip():
            raise InvalidInput("game", "give a game as <provider>:<game_id> (e.g. nba:0022400061) or its id")
        return [f"{p}:{game}" for p in sorted(PROVIDERS)]
    if provider not in PROVIDERS:
        known = ", ".join(sorted(PROVIDERS))
        raise InvalidInput("game", f"{game!r}: unknown provider {provider!r} (known: {known})")
    if not game_id:
        raise InvalidInput("game", f"{game!r}: no game id after the provider")
    return [game]


async def resolve_game(conn: Conn, game: str) -> str:
    """The history's game key for `game` (`nba:0022400061`, or `0022400061` when only
    one provider has that id)."""
    keys = candidate_keys(game)
    found = sorted(r.game_key for r in await _run(conn, "game_keys", {"keys": keys}))
    if not found:
        raise GameNotFound(f"no events of game {game!r} in the history (keys look like nba:0022400061)")
    if len(found) > 1:
        raise InvalidInput("game", f"{game!r} is ambiguous: {', '.join(found)}; give the provider")
    return found[0]


async def events_of_game(
    conn: Conn,
    game_key: str,
    *,
    since: datetime | None = None,
    kinds: Sequence[str] = (),
    limit: int = DEFAULT_LIMIT,
) -> list[StoredEvent]:
    params = {"key": game_key, "since": since or _EPOCH, "kinds": list(kinds), "limit": limit}
    return [event_from_row(r) for r in await _run(conn, "game_events", params)]


@dataclass(frozen=True)
class Minute:
    minute: datetime
    events: int
    score_changes: int


async def minutes_of_game(conn: Conn, game_key: str) -> list[Minute]:
    rows = await _run(conn, "game_minutes", {"key": game_key})
    return [Minute(r.minute, int(r.events), int(r.score_changes)) for r in rows]


@dataclass
class GameSummary:
    """What the history says of one game."""

    game_key: str
    teams: dict[str, str] = field(default_factory=dict)  # home, away
    status: str = "scheduled"
    score: dict[str, int | None] = field(default_factory=lambda: {"home": None, "away": None})
    periods: dict[int, dict[str, int | None]] = field(default_factory=dict)
    corrected: bool = False


def summarize(game_key: str, events: Sequence[StoredEvent]) -> GameSummary:
    """Status, score and line score by period, from the game's events in time order: the
    final's periods when there is a final, the periods' ends before that; a stat
    correction's score over the final's."""
    s = GameSummary(game_key)
    for e in events:
        d = e.data
        if "home_team" in d:
            s.teams = {"home": d["home_team"], "away": d["away_team"]}
        if e.kind == "game.started":
            s.status = "live"
        elif e.kind == "score.changed":
            s.status = "live" if s.status == "scheduled" else s.status
            s.score = {"home": d.get("home_score"), "away": d.get("away_score")}
        elif e.kind in ("period.ended", "period.score") and d.get("home") is not None:
            s.periods[int(d["period"])] = {"home": d.get("home"), "away": d.get("away")}
        elif e.kind == "game.final":
            s.status = "final"
            s.score = {"home": d.get("home_score"), "away": d.get("away_score")}
            for p in d.get("periods", []):
                s.periods[int(p["period"])] = {"home": p.get("home"), "away": p.get("away")}
        elif e.kind == "score.corrected":
            after = d.get("after", {})
            s.score = {"home": after.get("home_score"), "away": after.get("away_score")}
            s.corrected = True
        elif e.kind in ("game.postponed", "game.cancelled"):
            s.status = e.kind.partition(".")[2]
    s.periods = dict(sorted(s.periods.items()))
    return s


async def events_of_games(
    conn: Conn, task_ids: Sequence[Any], *, since: datetime | None = None
) -> list[StoredEvent]:
    """The events of these game tasks (a day's board) in time order."""
    params = {"task_ids": list(task_ids), "since": since or _EPOCH}
    return [event_from_row(r) for r in await _run(conn, "games_events", params)]


def current_period(events: Sequence[StoredEvent]) -> int | None:
    """The period a game is in (or ended in), from its latest events."""
    period = None
    for e in events:
        p = e.data.get("period")
        if isinstance(p, int) and e.kind in ("score.changed", "period.ended"):
            period = p + 1 if e.kind == "period.ended" else max(p, period or 0)
        elif e.kind == "game.final" and e.data.get("periods"):
            period = max(int(x["period"]) for x in e.data["periods"])
    return period


# A game's events read for its document, at most (a game has a few hundred).
MAX_GAME_EVENTS = 100_000


async def game_document(conn: Conn, key: str) -> dict[str, Any]:
    """A game from the history, as `taskmgr games show` and the API's game route give it:
    its teams, status, score by period, its events in order (each with a one-line
    summary) and its events per minute (a TimescaleDB time_bucket)."""
    events = await events_of_game(conn, key, limit=MAX_GAME_EVENTS)
    minutes = await minutes_of_game(conn, key)
    s = summarize(key, events)
    return {
        "game": key,
        "home": s.teams.get("home"),
        "away": s.teams.get("away"),
        "status": s.status,
        "score": s.score,
        "corrected": s.corrected,
        "periods": [{"period": n, **line} for n, line in s.periods.items()],
        "events": [
            {
                "time": e.time,
                "kind": e.kind,
                "task_type": e.task_type,
                "task_id": e.task_id,
                "event_id": e.event_id,
                "runner_id": e.runner_id,
                "summary": event_summary(e.kind, e.data),
                "data": e.data,
            }
            for e in events
        ],
        "per_minute": [
            {"minute": m.minute, "events": m.events, "score_changes": m.score_changes} for m in minutes
        ],
    }


def event_summary(kind: str, d: dict[str, Any]) -> str:
    """One line of a game event, for people."""
    if kind == "score.changed":
        return f"P{d.get('period')}: {d.get('away_score')}-{d.get('home_score')} (away-home)"
    if kind in ("period.ended", "period.score"):
        return f"P{d.get('period')}: {d.get('away')}-{d.get('home')}"
    if kind == "game.final":
        return f"final {d.get('away_score')}-{d.get('home_score')}"
    if kind == "score.corrected":
        b, a = d.get("before", {}), d.get("after", {})
        return f"{b.get('away_score')}-{b.get('home_score')} -> {a.get('away_score')}-{a.get('home_score')}"
    if kind == "game.started":
        return f"{d.get('away_team')} at {d.get('home_team')}"
    return str(d.get("detail", ""))[:80]
