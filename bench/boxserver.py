"""A local box-score API for `taskmgr bench runner`, run as its own process:

    python -m bench.boxserver --port P [--etag]

Serves a recorded NBA live box score (tests/fixtures/nba, made live: 1st quarter, so a
poll of a game in progress and no follow-on tasks) at the NBA CDN path for any game id,
compact JSON (~32 KB). With --etag the response has an ETag and a matching If-None-Match
gets 304. GET /_stats: {"requests": n, "not_modified": m, "close_repeats": r}, where
`close_repeats` counts polls of a game less than --min-gap seconds after its previous
poll (two pollers of one game: the fleet benchmark); GET /_polled?since=EPOCH: how many
games were polled at or after that time. For `taskmgr bench lifecycle`: GET /life/{name}
answers a small JSON object and keeps the time of the first request for each name;
GET /_life returns them ({name: epoch}). Prints "ready" when listening.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from aiohttp import web

FIXTURE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "tests",
    "fixtures",
    "nba",
    "dliu713_nba-scores-website__boxscore_0042200123.json",
)


def live_body() -> bytes:
    with open(FIXTURE) as f:
        doc = json.load(f)
    g = doc["game"]
    g["gameStatus"] = 2
    g["gameStatusText"] = "Q1 5:12"
    g["period"] = 1
    g["gameClock"] = "PT05M12.00S"
    return json.dumps(doc, separators=(",", ":")).encode()


def app(etag: bool, min_gap: float = 0.0) -> web.Application:
    body = live_body()
    tag = '"bench-v1"'
    stats = {"requests": 0, "not_modified": 0, "bytes": len(body), "close_repeats": 0}
    last: dict[str, float] = {}  # game (the path's name) -> time of its last poll
    first: dict[str, float] = {}  # /life/{name} -> time of its first request
    small = b'{"ok":true}'

    async def box(request: web.Request) -> web.Response:
        stats["requests"] += 1
        if min_gap:
            now, name = time.time(), request.match_info["name"]
            if now - last.get(name, 0.0) < min_gap:
                stats["close_repeats"] += 1
            last[name] = now
        if etag:
            if request.headers.get("If-None-Match") == tag:
                stats["not_modified"] += 1
                return web.Response(status=304, headers={"ETag": tag})
            return web.Response(body=body, content_type="application/json", headers={"ETag": tag})
        return web.Response(body=body, content_type="application/json")

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def polled(request: web.Request) -> web.Response:
        since = float(request.query.get("since", "0"))
        return web.json_response({"games": sum(t >= since for t in last.values())})

    async def life(request: web.Request) -> web.Response:
        stats["requests"] += 1
        first.setdefault(request.match_info["name"], time.time())
        return web.Response(body=small, content_type="application/json")

    async def get_life(request: web.Request) -> web.Response:
        return web.json_response(first)

    a = web.Application()
    a.router.add_get("/life/{name}", life)
    a.router.add_get("/_life", get_life)
    a.router.add_get("/_stats", get_stats)
    a.router.add_get("/_polled", polled)
    a.router.add_get("/nba/static/json/liveData/boxscore/{name}", box)
    return a


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--etag", action="store_true")
    ap.add_argument("--min-gap", type=float, default=0.0)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(
        app(args.etag, args.min_gap),
        host="127.0.0.1",
        port=args.port,
        print=lambda *_: print("ready", flush=True),
        access_log=None,
    )


if __name__ == "__main__":
    main()
