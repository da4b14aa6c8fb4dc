"""The consumer kit (issue #12, items 2 and 4): replay from the events stream over plain
AMQP, a routing-key filter, ack after the handler returns, dedup by event id, resume
from a stored offset, typed models per kind; the consumer user may read the stream and
nothing more."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused

from task_types.events import ScoreChanged
from taskmgr.broker import Publisher, Topology
from taskmgr.consumer import (
    ConsumerError,
    EventModels,
    EventStream,
    FileOffsets,
    MemoryOffsets,
    Received,
    SqlOffsets,
    topic_matcher,
)
from taskmgr.messages import Event
from taskmgr.settings import Settings
from tests.event_helpers import make_event, publish, repeat_of
from tests.helpers import amqp_as

GAME = {"provider": "nba", "league": "nba", "game_id": "g1", "home_team": "BOS", "away_team": "NYK"}


def score(n: int, task: uuid.UUID, **kw: object) -> Event:
    return make_event(
        n,
        task_id=task,
        data={**GAME, "home_score": n, "away_score": 0, "period": 1},
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
async def events_publisher(settings: Settings) -> AsyncIterator[Publisher]:
    async with Publisher(url=settings.amqp_url, topology=Topology.from_settings(settings)) as pub:
        yield pub


def consumer_url(settings: Settings) -> str:
    return amqp_as(settings.amqp_url, "taskmgr_consumer")


async def take(stream: EventStream, n: int, timeout: float = 10.0) -> list[Received]:
    got: list[Received] = []
    async with asyncio.timeout(timeout):
        async for received in stream:
            got.append(received)
            if len(got) == n:
                break
    return got


async def nothing_more(stream: EventStream, wait_s: float = 0.7) -> bool:
    try:
        async with asyncio.timeout(wait_s):
            await anext(aiter(stream))
    except TimeoutError:
        return True
    return False


# -- pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("#", ["a", "live_game.score.changed"], []),
        ("live_game.#", ["live_game.score.changed", "live_game"], ["period_score.period.score"]),
        ("*.score.*", ["live_game.score.changed"], ["live_game.score", "a.b.score.c"]),
        ("#.final", ["live_game.game.final", "final"], ["live_game.game.finalx"]),
        ("live_game.score.changed", ["live_game.score.changed"], ["live_game.score.changedx"]),
    ],
)
def test_routing_key_patterns_match_as_amqp_topics(pattern: str, yes: list[str], no: list[str]) -> None:
    match = topic_matcher([pattern])
    assert all(match(k) for k in yes) and not any(match(k) for k in no)


@pytest.mark.parametrize("pattern", ["", "a..b", "a b", "score.changed!", "a.#x"])
def test_a_bad_pattern_is_refused_with_the_reason(pattern: str) -> None:
    with pytest.raises(ConsumerError, match="routing-key pattern"):
        topic_matcher([pattern])


@pytest.mark.parametrize("start", [-1, "middle", True, datetime(2026, 1, 1), timedelta(0), 1.5])
def test_a_bad_start_is_refused_before_connecting(start: object) -> None:
    with pytest.raises(ConsumerError, match="start"):
        EventStream(url="amqp://nowhere:1/", start=start)  # type: ignore[arg-type]


async def test_a_corrupt_offset_file_is_an_error_not_a_silent_restart(tmp_path: Path) -> None:
    path = tmp_path / "offset.json"
    path.write_text("{not json")
    with pytest.raises(ConsumerError, match="offset file"):
        await FileOffsets(path).load()
    await FileOffsets(path).save(41)
    assert await FileOffsets(path).load() == 41


def test_the_default_models_cover_the_built_in_kinds() -> None:
    models = EventModels.default()
    assert models.get("live_game.score.changed", 1) is ScoreChanged
    assert models.get("live_game.score.changed", 2) is None


# -- against the stream ----------------------------------------------------------------


async def test_replay_from_the_start_typed_in_order_as_the_consumer_user(
    settings: Settings, events_publisher: Publisher
) -> None:
    task = uuid.uuid4()
    events = [score(i, task) for i in range(60)]
    await publish(events_publisher, events)
    async with EventStream(url=consumer_url(settings), prefix=settings.amqp_prefix, start="first") as stream:
        got = await take(stream, 60)
        assert [r.event_id for r in got] == [e.event_id for e in events]
        assert [r.offset for r in got] == list(range(60))
        assert all(isinstance(r.data, ScoreChanged) for r in got)
        assert got[5].data.home_score == 5 and got[5].data.game_key == "nba:g1"
        assert await nothing_more(stream)


async def test_filter_and_dedup_by_event_id(settings: Settings, events_publisher: Publisher) -> None:
    task = uuid.uuid4()
    scores = [score(i, task) for i in range(10)]
    others = [make_event(i, kind="period.ended", data={"n": i}) for i in range(5)]
    mixed = [*scores[:5], *others, repeat_of(scores[2]), *scores[5:], repeat_of(scores[7])]
    await publish(events_publisher, mixed)
    async with EventStream(
        url=consumer_url(settings),
        prefix=settings.amqp_prefix,
        start="first",
        routing_keys=["live_game.score.*"],
    ) as stream:
        got = await take(stream, 10)
        assert [r.event_id for r in got] == [e.event_id for e in scores]
        assert await nothing_more(stream)
    assert (stream.counts.filtered, stream.counts.repeats, stream.counts.handed) == (5, 2, 10)


async def test_resume_after_a_restart_no_gap_no_repeat_window_rebuilt(
    settings: Settings, events_publisher: Publisher, tmp_path: Path
) -> None:
    task = uuid.uuid4()
    first = [score(i, task) for i in range(30)]
    await publish(events_publisher, first)
    offsets = FileOffsets(tmp_path / "offset.json")
    kw = {"url": consumer_url(settings), "prefix": settings.amqp_prefix, "start": "first", "offsets": offsets}
    async with EventStream(**kw) as stream:  # type: ignore[arg-type]
        got = await take(stream, 20)
    # The 20th was handed and its handler returned (the loop broke after it), but the
    # loop never asked for the 21st: the 20th is not settled, so it comes again.
    assert await offsets.load() == 18
    later = [repeat_of(first[3]), score(30, task), repeat_of(first[25])]
    await publish(events_publisher, later)
    async with EventStream(**kw) as stream:  # type: ignore[arg-type]
        again = await take(stream, 12)
        assert await nothing_more(stream)
        assert stream.counts.warmup == 19
    ids = [r.event_id for r in got[:19]] + [r.event_id for r in again]
    assert ids == [e.event_id for e in first] + [later[1].event_id]
    # first[3] again: dropped by the rebuilt window; first[25] again: by this run's.
    assert stream.counts.repeats == 2


async def test_a_handler_that_raises_gets_the_event_again_after_a_restart(
    settings: Settings, events_publisher: Publisher
) -> None:
    task = uuid.uuid4()
    events = [score(i, task) for i in range(5)]
    await publish(events_publisher, events)
    offsets = MemoryOffsets()
    kw = {"url": consumer_url(settings), "prefix": settings.amqp_prefix, "start": "first", "offsets": offsets}
    handled: list[uuid.UUID] = []
    with pytest.raises(RuntimeError):
        async with EventStream(**kw) as stream:  # type: ignore[arg-type]
            async for r in stream:
                if r.data.home_score == 3:
                    raise RuntimeError("the handler failed")
                handled.append(r.event_id)
    assert offsets.offset == 2
    async with EventStream(**kw) as stream:  # type: ignore[arg-type]
        rest = await take(stream, 2)
    assert handled + [r.event_id for r in rest] == [e.event_id for e in events]


async def test_start_from_a_time_or_an_offset(settings: Settings, events_publisher: Publisher) -> None:
    task = uuid.uuid4()
    before = [score(i, task) for i in range(5)]
    await publish(events_publisher, before)
    await asyncio.sleep(2.0)  # stream timestamps are per chunk: a later chunk
    since = datetime.now(UTC)
    after = [score(i, task) for i in range(5, 10)]
    await publish(events_publisher, after)
    url, prefix = consumer_url(settings), settings.amqp_prefix
    async with EventStream(url=url, prefix=prefix, start=since - timedelta(milliseconds=200)) as stream:
        got = await take(stream, 5)
        assert [r.event_id for r in got] == [e.event_id for e in after]
    async with EventStream(url=url, prefix=prefix, start=3) as stream:
        got = await take(stream, 7)
        assert [r.offset for r in got] == list(range(3, 10))


async def test_an_event_that_does_not_fit_its_model_is_skipped_with_the_reason(
    settings: Settings, events_publisher: Publisher
) -> None:
    task = uuid.uuid4()
    bad = make_event(1, task_id=task, data={**GAME, "home_score": "many", "away_score": 0, "period": 1})
    good = score(2, task)
    newer = score(3, task).model_copy(update={"version": 2, "data": {"shape": "of the future"}})
    await publish(events_publisher, [bad, good, newer])
    async with EventStream(url=consumer_url(settings), prefix=settings.amqp_prefix, start="first") as stream:
        got = await take(stream, 2)
    assert [r.event_id for r in got] == [good.event_id, newer.event_id]
    assert got[1].data == {"shape": "of the future"} and not got[1].typed  # no model for v2: a dict
    assert stream.counts.invalid == 1 and "home_score" in stream.counts.invalid_reasons[0]


async def test_a_lost_connection_is_read_again_from_the_last_settled_event(
    settings: Settings, events_publisher: Publisher
) -> None:
    task = uuid.uuid4()
    events = [score(i, task) for i in range(40)]
    await publish(events_publisher, events)
    async with EventStream(url=consumer_url(settings), prefix=settings.amqp_prefix, start="first") as stream:
        got = await take(stream, 15)
        assert stream._reader is not None and stream._reader._conn is not None
        await stream._reader._conn.close()  # as a broker restart would
        got += await take(stream, 25, timeout=20)
    assert [r.event_id for r in got] == [e.event_id for e in events]
    assert stream.counts.reconnects == 1


async def test_sql_offsets_commit_with_the_handlers_writes(engine, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    name = f"test-{uuid.uuid4().hex[:8]}"
    offsets = SqlOffsets(engine, name)
    await offsets.setup()
    assert await offsets.load() is None
    with pytest.raises(RuntimeError):
        async with engine.begin() as conn:
            await offsets.save_in(conn, 7)
            raise RuntimeError("the handler's transaction rolls back")
    assert await offsets.load() is None
    await offsets.save(7)
    await offsets.save(9)
    assert await offsets.load() == 9


async def test_the_consumer_user_may_read_the_stream_and_nothing_more(
    settings: Settings, events_publisher: Publisher
) -> None:
    topo = Topology(settings.amqp_prefix)
    conn = await aio_pika.connect(consumer_url(settings))
    try:
        attempts = {
            "delete the stream": lambda ch: ch.queue_delete(topo.events_stream),
            "declare it": lambda ch: ch.declare_queue(
                topo.events_stream, durable=True, arguments={"x-queue-type": "stream"}
            ),
            "bind it to the events exchange": lambda ch: _bind(ch, topo.events_stream, topo.events),
            "publish to the events exchange": lambda ch: _publish(ch, topo.events),
            "read the recorder's queue": lambda ch: _consume(ch, topo.events_recorder),
        }
        for what, attempt in attempts.items():
            ch = await conn.channel()
            with pytest.raises(ChannelAccessRefused):
                await attempt(ch)
                if what.startswith("publish"):
                    await ch.close()  # the refusal closes the channel asynchronously
                    raise AssertionError(f"the consumer user could {what}")
    finally:
        await conn.close()


async def _bind(ch: aio_pika.abc.AbstractChannel, queue: str, exchange: str) -> None:
    q = await ch.get_queue(queue, ensure=False)
    await q.bind(exchange, routing_key="#")


async def _publish(ch: aio_pika.abc.AbstractChannel, exchange: str) -> None:
    ex = await ch.get_exchange(exchange, ensure=False)
    await ex.publish(aio_pika.Message(b"{}"), routing_key="live_game.score.changed")
    await asyncio.sleep(0.5)
    await ch.declare_exchange(exchange, passive=True)  # raises once the channel was closed


async def _consume(ch: aio_pika.abc.AbstractChannel, queue: str) -> None:
    async def ignore(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
        return None

    q = await ch.get_queue(queue, ensure=False)
    await q.consume(ignore)
