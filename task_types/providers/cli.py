"""`taskmgr providers parse PROVIDER KIND FILE`: what an adapter makes of a saved body."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from task_types.providers import get_provider
from task_types.providers.model import Game

KINDS = ("schedule", "game")


class ParseFileError(ValueError):
    """The file could not be read or is not JSON (the adapter's own errors are ParseError)."""


def game_to_dict(game: Game) -> dict[str, Any]:
    """A JSON-able view of a Game (times as ISO-8601, status as its value)."""
    data = asdict(game)
    data["status"] = game.status.value
    data["start_utc"] = game.start_utc.isoformat()
    data["periods"] = [asdict(p) for p in game.periods]
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in data.items()}


def parse_file(provider: str, kind: str, path: str, league: str | None = None) -> dict[str, Any]:
    """Parse a saved response with a provider's adapter.

    Raises UnknownProvider (a LookupError) for an unknown provider, ValueError for an
    unknown kind, ParseFileError for an unreadable or non-JSON file and ParseError when
    the adapter does not understand the body.
    """
    adapter = get_provider(provider)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of: {', '.join(KINDS)}")
    league = league or ("basketball/nba" if provider == "espn" else provider)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ParseFileError(f"cannot read {path}: {exc}") from exc
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ParseFileError(f"{path} is not JSON: {exc}") from exc
    if kind == "game":
        return {"provider": provider, "kind": kind, "game": game_to_dict(adapter.parse_game(body, league))}
    games = adapter.parse_schedule(body, league)
    return {
        "provider": provider,
        "kind": kind,
        "count": len(games),
        "games": [game_to_dict(g) for g in games],
    }
