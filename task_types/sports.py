"""What the sports handlers share: reading the payload, building URLs, parsing a body."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

import httpx

from task_types.providers import UnknownProvider, get_provider
from task_types.providers.model import Game
from task_types.providers.protocol import Provider
from task_types.settings import SportsSettings
from taskmgr.handlers import BaseHandler, HandlerError, json_body


class SportsHandler(BaseHandler):
    """A handler that calls the providers' APIs: `{base}` in its URL template is the
    payload's provider's base URL (SportsSettings: the real API or the simulated feed)."""

    def __init__(self, bases: Mapping[str, str] | None = None) -> None:
        self._bases = dict(bases if bases is not None else SportsSettings().base_urls())

    def url(self, url_template: str, payload: Mapping[str, Any]) -> str:
        return fill_url(url_template, payload, self._bases)

    def base_urls(self) -> Sequence[str]:
        return list(self._bases.values())


def game_url_template(provider: str) -> str:
    """The provider's box-score URL as a template, e.g.
    "{base}/static/json/liveData/boxscore/boxscore_{game_id}.json" for "nba"."""
    return "{base}" + get_provider(provider).game_path("{game_id}", "{league}")


def require(payload: Mapping[str, Any], key: str) -> Any:
    if key not in payload or payload[key] in (None, ""):
        raise HandlerError(f"payload needs {key!r}")
    return payload[key]


def provider_of(payload: Mapping[str, Any]) -> Provider:
    try:
        return get_provider(str(require(payload, "provider")))
    except UnknownProvider as exc:
        raise HandlerError(str(exc)) from exc


def payload_day(payload: Mapping[str, Any]) -> date:
    raw = require(payload, "date")
    try:
        return date.fromisoformat(str(raw))
    except ValueError:
        raise HandlerError(f"payload date {raw!r} is not YYYY-MM-DD") from None


def fill_url(template: str, payload: Mapping[str, Any], base_urls: Mapping[str, str]) -> str:
    """The template with `{base}`, the payload's fields, and `{game_path}` (when the
    payload names a game) or `{schedule_path}` (when it names a date)."""
    provider = provider_of(payload)
    league = str(payload.get("league", provider.name))
    values: dict[str, Any] = {**payload, "base": base_urls.get(provider.name, provider.default_base_url)}
    values.setdefault("league", league)
    if "game_id" in payload:
        values["game_path"] = provider.game_path(str(payload["game_id"]), league)
    if "date" in payload:
        values["schedule_path"] = provider.schedule_path(payload_day(payload), league)
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise HandlerError(f"url template {template!r} needs {exc} from the payload") from exc


def parse_game(payload: Mapping[str, Any], response: httpx.Response) -> Game:
    provider = provider_of(payload)
    league = str(payload.get("league", provider.name))
    return provider.parse_game(json_body(response, provider.name), league)


def game_ref(game: Game) -> dict[str, Any]:
    """The identifying fields every game event carries."""
    return {
        "provider": game.provider,
        "league": game.league,
        "game_id": game.game_id,
        "home_team": game.home_team,
        "away_team": game.away_team,
    }
