"""The feed's HTTP server: each provider's real paths under a provider prefix, ETags,
the faults a harness turns on (`/_faults`), and the ground truth (`/_truth`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Any

from aiohttp import web

from task_types.feed.bodies import BOMB, SimulatedDay, _bomb
from task_types.feed.simulation import LEAGUES, FeedConfig, SimGame
from task_types.providers.espn import league_path

# -- the HTTP server ---------------------------------------------------------------------


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags


class _FeedServer:
    """One running feed: its simulated day, its fault settings and its fault RNG."""

    def __init__(self, config: FeedConfig, epoch: datetime) -> None:
        self.day = SimulatedDay(config, epoch)
        # Seeded so a run's faults can be replayed; separate from the games' generators
        # so that faults never change what happens in a game.
        self.fault_rng = random.Random(f"{config.seed}:faults")

    @staticmethod
    def now() -> datetime:
        return datetime.now(UTC)

    def app(self) -> web.Application:
        app = web.Application()
        routes = [
            web.get("/nba/static/json/liveData/scoreboard/todaysScoreboard_00.json", self.nba_schedule),
            web.get("/nba/static/json/liveData/boxscore/boxscore_{game_id}.json", self.nba_game),
            web.get("/espn/apis/site/v2/sports/{sport}/{league}/scoreboard", self.espn_schedule),
            web.get("/espn/apis/site/v2/sports/{sport}/{league}/summary", self.espn_game),
            web.get("/mlb/api/v1/schedule", self.mlb_schedule),
            web.get("/mlb/api/v1.1/game/{game_id}/feed/live", self.mlb_game),
            web.get("/nhl/v1/schedule/{date}", self.nhl_schedule),
            web.get("/nhl/v1/gamecenter/{game_id}/boxscore", self.nhl_game),
            web.get("/_truth", self.truth),
            web.get("/_faults", self.get_faults),
            web.post("/_faults", self.set_faults),
            web.get("/", self.index),
        ]
        app.add_routes(routes)
        return app

    # -- plumbing --

    @staticmethod
    def _json(request: web.Request, body: Any, status: int = 200) -> web.Response:
        raw = json.dumps(body, separators=(",", ":")).encode()
        etag = _etag(raw)
        if status == 200 and _matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=raw, status=status, content_type="application/json", headers={"ETag": etag})

    async def _serve(self, request: web.Request, make_body: Any) -> web.StreamResponse:
        """Apply the faults, then answer with the body `make_body()` builds."""
        faults = self.day.faults
        roll = self.fault_rng.random
        if roll() < faults.timeout:
            # Longer than clients wait; the handler is cancelled when the client gives up.
            await asyncio.sleep(faults.timeout_s)
            return web.json_response({"error": "gateway timeout"}, status=504)
        if roll() < faults.error_5xx:
            return web.json_response({"error": "simulated server error"}, status=503)
        if roll() < faults.rate_limit_429:
            return web.json_response({"error": "rate limited"}, status=429, headers={"Retry-After": "1"})
        malformed = roll() < faults.malformed
        if roll() < faults.slow:
            await asyncio.sleep(faults.slow_s)
        body = make_body()
        if body is None:
            return web.json_response({"error": "not found"}, status=404)
        if body is BOMB:
            return web.Response(
                body=_bomb(), headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
            )
        if malformed:
            raw = json.dumps(body, separators=(",", ":")).encode()
            cut = raw[: max(1, len(raw) // 2)]
            return web.Response(body=cut, content_type="application/json", headers={"ETag": _etag(cut)})
        return self._json(request, body)

    def _game_body(self, provider: str, game_id: str) -> Any:
        if game_id in self.day.faults.bombs:
            return BOMB
        game = self.day.game(provider, game_id)
        return None if game is None else self.day.game_body(provider, game, self.now())

    @staticmethod
    def _date(raw: str | None, compact: bool = False) -> date | None:
        if not raw:
            return None
        try:
            if compact:
                return datetime.strptime(raw, "%Y%m%d").date()
            return date.fromisoformat(raw)
        except ValueError:
            raise web.HTTPBadRequest(text=f"bad date {raw!r}") from None

    # -- provider routes --

    async def nba_schedule(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, lambda: self.day.schedule_body("nba", self.now()))

    async def nba_game(self, request: web.Request) -> web.StreamResponse:
        game_id = request.match_info["game_id"]
        return await self._serve(request, lambda: self._game_body("nba", game_id))

    async def espn_schedule(self, request: web.Request) -> web.StreamResponse:
        league = f"{request.match_info['sport']}/{request.match_info['league']}"
        day = self._date(request.query.get("dates"), compact=True)

        def body() -> Any:
            if league_path(league) != LEAGUES["espn"]:
                return self.day.schedule_body("espn", self.now(), day=date.min)
            return self.day.schedule_body("espn", self.now(), day=day)

        return await self._serve(request, body)

    async def espn_game(self, request: web.Request) -> web.StreamResponse:
        event = request.query.get("event", "")
        return await self._serve(request, lambda: self._game_body("espn", event))

    async def mlb_schedule(self, request: web.Request) -> web.StreamResponse:
        day = self._date(request.query.get("date"))
        return await self._serve(request, lambda: self.day.schedule_body("mlb", self.now(), day=day))

    async def mlb_game(self, request: web.Request) -> web.StreamResponse:
        game_id = request.match_info["game_id"]
        return await self._serve(request, lambda: self._game_body("mlb", game_id))

    async def nhl_schedule(self, request: web.Request) -> web.StreamResponse:
        day = self._date(request.match_info["date"])
        return await self._serve(request, lambda: self.day.schedule_body("nhl", self.now(), day=day))

    async def nhl_game(self, request: web.Request) -> web.StreamResponse:
        game_id = request.match_info["game_id"]
        return await self._serve(request, lambda: self._game_body("nhl", game_id))

    # -- control routes (never faulty) --

    async def truth(self, request: web.Request) -> web.StreamResponse:
        return self._json(request, self.day.truth(self.now()))

    async def get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(asdict(self.day.faults))

    async def set_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            self.day.faults = self.day.faults.updated(changes)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self.day.faults))

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "providers": list(self.day.config.providers),
                "day": self.day.day.isoformat(),
                "games": [{"provider": g.provider, "game_id": g.game_id} for g in self.day.games],
            }
        )


@dataclass
class RunningFeed:
    """A feed serving on `url`; `base_urls()` gives each provider's base for the adapters."""

    url: str
    day: SimulatedDay
    _runner: web.AppRunner

    def base_urls(self) -> dict[str, str]:
        return {provider: f"{self.url}/{provider}" for provider in self.day.config.providers}

    def games(self) -> list[SimGame]:
        return list(self.day.games)

    def truth(self) -> dict[str, Any]:
        return self.day.truth(datetime.now(UTC))

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_feed(config: FeedConfig, host: str = "127.0.0.1", port: int = 0) -> RunningFeed:
    """Start the feed in the running event loop (port 0: any free port)."""
    server = _FeedServer(config, config.epoch or datetime.now(UTC))
    # handler_cancellation: a client that gives up on a "timeout" fault frees its
    # handler at once; a short shutdown_timeout keeps close() from waiting on hangs.
    runner = web.AppRunner(server.app(), handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    # aiohttp has no public accessor for the bound port; port 0 needs the real one.
    server_obj: Any = site._server
    sockets = getattr(server_obj, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return RunningFeed(url=f"http://{host}:{bound}", day=server.day, _runner=runner)


async def feed_day(url: str, timeout_s: float = 20.0) -> date:
    """Wait until a feed (started elsewhere) answers at `url`; return the day it plays."""
    import httpx

    async with httpx.AsyncClient() as client, asyncio.timeout(timeout_s):
        while True:
            try:
                r = await client.get(f"{url}/")
                if r.status_code == 200:
                    return date.fromisoformat(r.json()["day"])
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)


def main(config: FeedConfig, host: str = "127.0.0.1", port: int = 8099) -> None:
    """Serve until interrupted (for `taskmgr feed`)."""

    async def serve() -> None:
        feed = await start_feed(config, host, port)
        print(f"simulated feed on {feed.url} (day {feed.day.day}, {len(feed.day.games)} games)", flush=True)
        for provider, base in feed.base_urls().items():
            print(f"  {provider}: {base}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await feed.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass

