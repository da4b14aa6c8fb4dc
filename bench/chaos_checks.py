"""The chaos day's invariants over what it saw: the events downstream consumers got
(against the feed's ground truth) and the store's final state."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from taskmgr.messages import Event


def event_invariants(
    events: Iterable[tuple[str, Event]], truth: Mapping[str, Any], reversed_games: set[str]
) -> dict[str, dict[str, Any]]:
    """One final per game with the feed's score, no id with two contents, no phantom
    score, the corrected score last where a score was taken back, and the coverage."""
    events = list(events)
    inv: dict[str, dict[str, Any]] = {}
    finals: dict[str, set[Any]] = defaultdict(set)
    wrong_final: list[str] = []
    contents: dict[str, Any] = {}
    phantom: list[tuple[str, Any]] = []
    seen_scores: dict[str, set[tuple[Any, Any]]] = defaultdict(set)
    conflicting = 0
    for _, ev in events:
        key = str(ev.event_id)
        if contents.setdefault(key, ev.data) != ev.data:
            conflicting += 1
        gid = str(ev.data.get("game_id", ""))
        if gid not in truth:
            continue
        g = truth[gid]
        if ev.event == "game.final":
            finals[gid].add(ev.event_id)
            if (ev.data.get("home_score"), ev.data.get("away_score")) != (
                g["final"]["home"],
                g["final"]["away"],
            ):
                wrong_final.append(gid)
        if ev.event == "score.changed":
            score = (ev.data.get("home_score"), ev.data.get("away_score"))
            real = {(c["home"], c["away"]) for c in g["score_changes"]} | {(0, 0)}
            if score not in real:
                phantom.append((gid, score))
            seen_scores[gid].add(score)
    last_score: dict[str, tuple[Any, Any]] = {}
    for _, ev in events:
        if ev.event == "score.changed":
            last_score[str(ev.data.get("game_id"))] = (
                ev.data.get("home_score"),
                ev.data.get("away_score"),
            )
    stale = {
        g: last_score.get(g)
        for g in reversed_games
        if g in truth and last_score.get(g) != (truth[g]["final"]["home"], truth[g]["final"]["away"])
    }
    inv["games with a score taken back end on the corrected score"] = {
        "ok": not stale,
        "games": len(reversed_games),
        "bad": stale,
    }
    bad_finals = {g: len(finals.get(g, ())) for g in truth if len(finals.get(g, ())) != 1}
    inv["one game.final event id per game"] = {"ok": not bad_finals, "bad": bad_finals}
    inv["final scores match the feed"] = {"ok": not wrong_final, "bad": wrong_final}
    inv["no event id with two contents"] = {"ok": conflicting == 0, "conflicts": conflicting}
    inv["no phantom scores"] = {"ok": not phantom, "bad": phantom[:10]}
    total = sum(len(g["score_changes"]) for g in truth.values())
    observed = sum(
        len({(c["home"], c["away"]) for c in g["score_changes"]} & seen_scores[gid])
        for gid, g in truth.items()
    )
    inv["score changes observed"] = {
        "ok": True,
        "observed": observed,
        "of": total,
        "share": round(observed / total, 3) if total else 1.0,
    }
    return inv


async def store_invariants(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
    """Nothing left STARTED or RUNNING, every game FINISHED, no attempt started twice."""
    inv: dict[str, dict[str, Any]] = {}
    async with engine.connect() as conn:
        stuck = (
            await conn.execute(
                text(
                    "select count(*) from tasks t join task_state s on s.task_id = t.id"
                    " where t.type in ('live_game', 'period_score', 'schedule')"
                    " and s.state in ('STARTED', 'RUNNING')"
                )
            )
        ).scalar_one()
        unfinished = (
            await conn.execute(
                text(
                    "select count(*) from tasks t join task_state s on s.task_id = t.id"
                    " where t.type = 'live_game' and s.state <> 'FINISHED'"
                )
            )
        ).scalar_one()
        double = (
            await conn.execute(
                text(
                    "select count(*) from (select task_id, attempt from task_events"
                    " where state = 'STARTED' and applied"
                    " group by 1, 2 having count(*) > 1) x"
                )
            )
        ).scalar_one()
    inv["nothing left STARTED or RUNNING"] = {"ok": stuck == 0, "stuck": stuck}
    inv["every game task FINISHED"] = {"ok": unfinished == 0, "unfinished": unfinished}
    inv["no attempt started twice"] = {"ok": double == 0, "doubles": double}
    return inv


async def recorder_invariants(
    engine: AsyncEngine, events: Sequence[tuple[str, Event]], settle_s: float = 30.0
) -> dict[str, dict[str, Any]]:
    """Every distinct event the harness saw on the exchange (game and lifecycle) is
    stored by the recorder, and each once. Waits (up to `settle_s`) for the recorder
    to catch up: the last lifecycle events follow the last state changes."""
    seen = {str(ev.event_id) for _, ev in events}
    stored: set[str] = set()
    rows = 0
    deadline = time.monotonic() + settle_s
    while True:
        async with engine.connect() as conn:
            result = await conn.execute(text("select event_id::text from emitted_events"))
            ids = [r[0] for r in result]
        rows, stored = len(ids), set(ids)
        if seen <= stored or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    missing, unseen = seen - stored, stored - seen
    return {
        "every event emitted is stored once": {
            "ok": not missing and rows == len(stored),
            "emitted": len(seen),
            "stored": len(stored),
            "stored_twice": rows - len(stored),
            "missing": sorted(missing)[:5],
            # Published while the harness's own queue was being restored after a broker
            # restart: the recorder's durable queue kept them, the harness's did not.
            "stored_not_seen_by_the_harness": len(unseen),
        }
    }
