"""The sports routes of the HTTP API: games from the event history (task_types/games.py)
with their game tasks' state and runner, for the console's live board. The engine's API
(manager/api) knows no games: the CLI adds this router, handing it the engine, the task
service and the API's read-scope dependency (this layer cannot import the manager)."""

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import AwareDatetime, BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from task_types.games import (
    candidate_keys,
    current_period,
    events_of_games,
    game_document,
    resolve_game,
    summarize,
)
from taskmgr.errors import InvalidInput
from taskmgr.service import TaskService, utcnow

GAME_TYPE = "live_game"
# Games on one board at most (a day of every league is a few hundred).
MAX_GAMES = 1000


class GameOut(BaseModel):
    task_id: uuid.UUID
    root_id: uuid.UUID
    game_key: str
    provider: str
    league: str
    game_id: str
    due_at: datetime
    state: str
    runner_id: str | None
    attempt: int
    home: str | None
    away: str | None
    status: str  # scheduled, live, final, postponed, cancelled
    home_score: int | None
    away_score: int | None
    period: int | None
    periods: dict[int, dict[str, int | None]]
    corrected: bool
    last_event_at: datetime | None


def router(*, engine: AsyncEngine, service: TaskService, read: Callable[..., Any]) -> APIRouter:
    r = APIRouter(prefix="/api/v1/games", tags=["games"])

    @r.get("", response_model=list[GameOut], summary="The games due in a time window, with their scores")
    async def list_games(
        _: Annotated[Any, Depends(read)],
        due_from: AwareDatetime | None = None,
        due_to: AwareDatetime | None = None,
        league: Annotated[str | None, Query(max_length=100)] = None,
    ) -> list[GameOut]:
        """Default window: the 24 hours from midnight UTC today."""
        if due_from is None:
            now = utcnow()
            due_from = now.replace(hour=0, minute=0, second=0, microsecond=0)
        due_to = due_to or due_from + timedelta(days=1)
        if due_to <= due_from:
            raise InvalidInput("query.due_to", "must be after due_from")
        tasks = await service.list_tasks(type=GAME_TYPE, due_from=due_from, due_to=due_to, limit=MAX_GAMES)
        tasks = [t for t in tasks if league is None or t.payload.get("league") == league]
        async with engine.connect() as conn:
            events = await events_of_games(conn, [t.id for t in tasks], since=due_from - timedelta(days=1))
        by_task: dict[uuid.UUID, list[Any]] = {}
        for e in events:
            by_task.setdefault(e.task_id, []).append(e)
        out = []
        for t in tasks:
            evs = by_task.get(t.id, [])
            key = f"{t.payload.get('provider')}:{t.payload.get('game_id')}"
            s = summarize(key, evs)
            out.append(
                GameOut(
                    task_id=t.id,
                    root_id=t.root_id,
                    game_key=key,
                    provider=str(t.payload.get("provider")),
                    league=str(t.payload.get("league")),
                    game_id=str(t.payload.get("game_id")),
                    due_at=t.due_at,
                    state=str(t.state),
                    runner_id=t.runner_id,
                    attempt=t.attempt,
                    home=s.teams.get("home"),
                    away=s.teams.get("away"),
                    status=s.status,
                    home_score=s.score.get("home"),
                    away_score=s.score.get("away"),
                    period=current_period(evs),
                    periods=s.periods,
                    corrected=s.corrected,
                    last_event_at=evs[-1].time if evs else None,
                )
            )
        return out

    @r.get("/{game}", summary="A game from the history: score by period, events, events per minute")
    async def get_game(
        game: Annotated[str, Path(max_length=200, description="<provider>:<game_id>, or the id alone")],
        _: Annotated[Any, Depends(read)],
    ) -> dict[str, Any]:
        try:
            candidate_keys(game)
            async with engine.connect() as conn:
                key = await resolve_game(conn, game)
        except InvalidInput as exc:
            raise InvalidInput(f"path.{exc.field}", exc.problem) from None
        async with engine.connect() as conn:
            return await game_document(conn, key)

    return r
