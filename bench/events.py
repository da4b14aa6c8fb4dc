"""`taskmgr bench events --events 200000`: the event path's throughput, and whether it
loses or doubles anything.

In a database of its own (`taskmgr_bench_events`, made anew, dropped at the end) and a
RabbitMQ prefix `bench<random>`:

1. The manager's topology is declared (the events exchange, the stream, the recorder's
   queue). `--events` distinct events (score changes of 500 games) and `--duplicates`
   (0.1) as many copies again (the same id and data from another runner, a little
   later, placed within 2,000 messages of the original, as a second runner or a new
   attempt would publish them) are published to the events exchange, persistent, with
   confirms. No recorder runs yet: the messages wait in its queue (and in the stream).
2. `--recorders` (1) `taskmgr recorder` processes start; timed from the first stored
   row to the last: `recorder.events_per_s` = distinct events stored per second, dedup
   included (goal >= 20,000).
3. Replay from the stream: taskmgr.consumer.EventStream from the first offset, dedup
   window on: `replay_stream.messages_per_s` (every copy read), `events` handed over.
4. Replay from the hypertable: taskmgr.event_store.replay, pages of 5,000 in (time, id)
   order: `replay_hypertable.events_per_s`.
5. The store path alone: the same messages decoded and stored in batches by this
   process into the emptied history (no broker): `store_path_alone.events_per_s`, the
   database side of the recorder, dedup included.
6. `lost` (published ids missing) and `duplicates_stored` (rows beyond one per id) in
   the history, the stream replay's lost and doubled ids: the goal is 0 each.

Everything shares the machine (PostgreSQL, RabbitMQ, the recorders and this process).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from bench._common import (
    Procs,
    child_env,
    cpu_seconds,
    fresh_database,
    log,
    machine,
    new_prefix,
    services_cpu,
    services_cpu_spent,
)
from taskmgr import broker, event_store
from taskmgr.broker import Publisher, Topology
from taskmgr.consumer import EventModels, EventStream
from taskmgr.db import make_engine
from taskmgr.messages import Event, decode_event, encode
from taskmgr.migrate import asyncpg_dsn, with_database
from taskmgr.settings import Settings

DB = "taskmgr_bench_events"
GAMES = 500
GOAL_PER_S = 20_000
PUBLISH_CHUNK = 2000
PUBLISHERS = 3  # connections publishing at once
NEAR = 2000  # a copy follows its original within this many messages


def _log(msg: str) -> None:
    log("events", msg)


def _events(n: int, duplicates: float, seed: int) -> tuple[list[Event], int]:
    """n distinct events and n * duplicates copies, in publish order."""
    rnd = random.Random(seed)
    start = datetime.now(UTC) - timedelta(hours=2)
    games = [(uuid.uuid4(), f"00224{g:05d}") for g in range(GAMES)]
    out: list[Event] = []
    for i in range(n):
        task, game_id = games[i % GAMES]
        k = i // GAMES
        out.append(
            Event(
                event_id=uuid.uuid5(task, f"score.changed|p1:{k}-0"),
                event="score.changed",
                task_type="live_game",
                task_id=task,
                root_task_id=task,
                task_runner_id="runner-a",
                attempt=1,
                observed_at=start + timedelta(milliseconds=30 * i),
                data={
                    "provider": "nba",
                    "league": "nba",
                    "game_id": game_id,
                    "home_team": "BOS",
                    "away_team": "NYK",
                    "home_score": 0,
                    "away_score": k,
                    "period": 1,
                },
            )
        )
    copies = int(n * duplicates)
    picks = sorted(rnd.sample(range(n), copies))
    placed: list[tuple[int, Event]] = []
    for i in picks:
        ev = out[i]
        copy = ev.model_copy(
            update={"task_runner_id": "runner-b", "observed_at": ev.observed_at + timedelta(seconds=1)}
        )
        placed.append((min(n, i + 1 + rnd.randrange(NEAR)), copy))
    order: list[Event] = []
    j = 0
    for i, ev in enumerate(out):
        while j < len(placed) and placed[j][0] <= i:
            order.append(placed[j][1])
            j += 1
        order.append(ev)
    order.extend(c for _, c in placed[j:])
    return order, copies


async def _publish(settings: Settings, topo: Topology, events: list[Event]) -> float:
    items = [
        (
            "events",
            f"{ev.task_type}.{ev.event}",
            encode(ev),
            {"task_id": str(ev.task_id), "event_id": str(ev.event_id), "task_runner_id": ev.task_runner_id},
            str(ev.event_id),
        )
        for ev in events
    ]
    chunks = [items[i : i + PUBLISH_CHUNK] for i in range(0, len(items), PUBLISH_CHUNK)]
    t = time.perf_counter()

    # Each connection publishes its chunks in order; chunks interleave across them, so
    # the queue's order is the list's order only roughly (as with several runners).
    async def lane(k: int) -> None:
        async with Publisher(
            url=settings.amqp_url, topology=topo, name=f"bench-pub{k}", declare=False
        ) as pub:
            for chunk in chunks[k::PUBLISHERS]:
                await pub.publish_many(chunk)

    await asyncio.gather(*(lane(k) for k in range(PUBLISHERS)))
    return time.perf_counter() - t


async def _ids(engine: Any) -> list[uuid.UUID]:
    async with engine.connect() as conn:
        return [r.event_id for r in await conn.execute(text("select event_id from emitted_events"))]


async def _count(engine: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("select count(*) from emitted_event_ids"))).scalar_one())


async def main(
    settings: Settings,
    events: int = 200_000,
    duplicates: float = 0.1,
    recorders: int = 1,
    batch: int = 5000,
    seed: int = 1,
) -> dict[str, Any]:
    if events < 1 or not 0 <= duplicates <= 1 or recorders < 1 or batch < 1:
        raise ValueError(
            "--events and --recorders at least 1, --duplicates between 0 and 1, --batch at least 1"
        )
    url = await fresh_database(settings, DB)
    prefix = new_prefix()
    bench = settings.model_copy(update={"database_url": url, "amqp_prefix": prefix, "recorder_batch": batch})
    topo = Topology.from_settings(bench)
    engine = make_engine(url, name="bench-events")
    procs = Procs("events")
    try:
        order, copies = _events(events, duplicates, seed)
        expected = {ev.event_id for ev in order}
        assert len(expected) == events
        async with Publisher(url=bench.amqp_url, topology=topo, name="bench-declare"):
            pass  # the manager's topology: the stream and the recorder's queue with it
        _log(f"publishing {len(order)} messages ({events} events, {copies} copies)")
        pub_s = await _publish(bench, topo, order)
        _log(f"published in {pub_s:.1f} s ({len(order) / pub_s:,.0f}/s)")

        # 2. The recorders drain the queue.
        env = child_env(bench, url, prefix, TASKMGR_RECORDER_BATCH=batch)
        started = time.perf_counter()
        services_before = services_cpu()
        children = [procs.start(["-m", "taskmgr.cli", "recorder"], env) for _ in range(recorders)]
        first = None
        stored = 0
        deadline = started + max(120.0, events / 1000)
        while stored < events and time.perf_counter() < deadline:
            stored = await _count(engine)
            if stored and first is None:
                first = time.perf_counter()
            await asyncio.sleep(0.05)
        done = time.perf_counter()
        cpu = {"recorders": round(sum(cpu_seconds(p.pid) for p in children), 2)}
        cpu.update(services_cpu_spent(services_before))
        # Let the last acks land, then the queue must be empty.
        await asyncio.sleep(1.0)
        depth = await broker.queue_depth(bench.amqp_url, topo.events_recorder)
        await procs.stop_all()
        steady = done - (first or started)
        rec = {
            "recorders": recorders,
            "batch": batch,
            "events_stored": stored,
            "seconds": round(steady, 2),
            "events_per_s": round(stored / steady) if steady > 0 else None,
            "messages_per_s": round(stored * (1 + duplicates) / steady) if steady > 0 else None,
            "seconds_from_process_start": round(done - started, 2),
            "queue_left": depth,
            "goal_per_s": GOAL_PER_S,
            # Where the machine's time went while the queue drained (process start
            # included): CPU microseconds per distinct event stored, and how many cores
            # the goal's rate would need at that cost.
            "cpu_seconds": cpu,
            "cpu_us_per_event": {k: round(v / stored * 1e6, 1) for k, v in cpu.items()} if stored else {},
            "cores_needed_at_goal": round(sum(cpu.values()) / stored * GOAL_PER_S, 2) if stored else None,
        }
        _log(f"recorder: {rec}")
        async with engine.connect() as conn:
            rows, distinct = await event_store.event_counts(conn)
        ids = set(await _ids(engine))

        # 3. Replay from the stream.
        t = time.perf_counter()
        handed: list[uuid.UUID] = []
        stream = EventStream(
            url=bench.amqp_url,
            prefix=prefix,
            name="bench-replay",
            start="first",
            models=EventModels.default(),
        )
        async with stream:
            async for received in stream:
                handed.append(received.event_id)
                if len(handed) == events:
                    break
        stream_s = time.perf_counter() - t
        read = stream.counts.handed + stream.counts.repeats
        replay_stream = {
            "messages_read": read,
            "events": len(handed),
            "repeats_dropped": stream.counts.repeats,
            "invalid": stream.counts.invalid,
            "seconds": round(stream_s, 2),
            "messages_per_s": round(read / stream_s),
            "events_per_s": round(len(handed) / stream_s),
            "lost": len(expected - set(handed)),
            "doubled": len(handed) - len(set(handed)),
        }
        _log(f"stream replay: {replay_stream}")

        # 4. Replay from the hypertable.
        t = time.perf_counter()
        from_table: list[uuid.UUID] = []
        async with engine.connect() as conn:
            async for page in event_store.replay(conn):
                from_table.extend(e.event_id for e in page)
        table_s = time.perf_counter() - t
        replay_table = {
            "events": len(from_table),
            "seconds": round(table_s, 2),
            "events_per_s": round(len(from_table) / table_s),
            "doubled": len(from_table) - len(set(from_table)),
        }
        _log(f"hypertable replay: {replay_table}")

        # 5. The store path alone (what the recorder does after the broker): decode each
        # message and store the batches, dedup included, into the emptied history.
        bodies = [encode(ev) for ev in order]
        async with engine.begin() as conn:
            await conn.execute(text(f"truncate {event_store.TABLES}"))
        t = time.perf_counter()
        stored_again = 0
        for i in range(0, len(bodies), batch):
            decoded = [decode_event(b) for b in bodies[i : i + batch]]
            async with engine.begin() as conn:
                stored_again += await event_store.record_events(conn, decoded)
        store_s = time.perf_counter() - t
        store_only = {
            "events_stored": stored_again,
            "seconds": round(store_s, 2),
            "events_per_s": round(stored_again / store_s),
            "messages_per_s": round(len(bodies) / store_s),
        }
        _log(f"store path alone: {store_only}")
        return {
            "bench": "events",
            "events": events,
            "copies": copies,
            "messages": len(order),
            "publish": {"seconds": round(pub_s, 2), "messages_per_s": round(len(order) / pub_s)},
            "recorder": rec,
            "store_path_alone": store_only,
            "replay_stream": replay_stream,
            "replay_hypertable": replay_table,
            "lost": len(expected - ids),
            "unexpected": len(ids - expected),
            "duplicates_stored": rows - distinct,
            "ok": rows == distinct == events
            and not (expected - ids)
            and replay_stream["lost"] == replay_stream["doubled"] == 0
            and replay_table["doubled"] == 0
            and stored_again == events,
            "machine": machine(),
        }
    finally:
        await procs.stop_all()
        await engine.dispose()
        await broker.delete_names(bench.amqp_url, topo)
        await _drop_database(settings, url)


async def _drop_database(settings: Settings, url: str) -> None:
    import asyncpg

    name = url.rpartition("/")[2].partition("?")[0]
    admin = await asyncpg.connect(asyncpg_dsn(with_database(settings.database_url, "postgres")))
    try:
        await admin.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await admin.close()
