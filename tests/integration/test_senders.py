"""Every identity can do only its own job on the broker, and a message's sender is
checked, not assumed: RabbitMQ's permissions (scripts/setup.sh) for who may publish
where, and its validated user_id for who sent a progress message. Real RabbitMQ users."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import pytest
from aiormq.exceptions import AMQPError, ChannelAccessRefused, ChannelPreconditionFailed

from manager.intake import ProgressIntake
from taskmgr import broker
from taskmgr.broker import REASON_HEADER, Consumer, Publisher, Topology
from taskmgr.messages import Heartbeat, ServiceReport, encode
from taskmgr.settings import Settings
from tests.helpers import amqp_as

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
async def declared(settings: Settings, topology: Topology) -> AsyncIterator[Publisher]:
    """The topology as the manager declares it, with the default pool's queue."""
    async with Publisher(url=amqp_as(settings.amqp_url, "taskmgr_manager"), topology=topology) as pub:
        await pub.ensure_pool("default")
        yield pub


async def publish_as(settings: Settings, user: str, exchange: str, routing_key: str, **props: object) -> None:
    """Publish one message with confirms as `user`; raises when the broker refuses."""
    conn = await aio_pika.connect(amqp_as(settings.amqp_url, user))
    try:
        ch = await conn.channel(publisher_confirms=True)
        ex = ch.default_exchange if exchange == "" else await ch.get_exchange(exchange, ensure=False)
        await ex.publish(aio_pika.Message(b"{}", **props), routing_key=routing_key)  # type: ignore[arg-type]
    finally:
        await conn.close()


REFUSED = (ChannelAccessRefused, ChannelPreconditionFailed, aio_pika.exceptions.ChannelClosed, AMQPError)


def targets(t: Topology) -> dict[str, tuple[str, str]]:
    return {
        "default exchange to the progress queue": ("", t.progress),
        "default exchange to a start queue": ("", t.start_queue("default")),
        "start orders": (t.start, "default"),
        "stops": (t.control, "some-runner"),
        "reports": (t.reports, ""),
        "events": (t.events, "live_game.game.final"),
        "dead letters": (t.dlx, ""),
    }


MAY_PUBLISH = {
    "taskmgr_consumer": set(),
    "taskmgr_service": {"reports"},
    "taskmgr_runner": {"reports", "events", "dead letters"},
    "taskmgr_manager": {"start orders", "stops", "events", "dead letters"},
}


@pytest.mark.parametrize("user", list(MAY_PUBLISH))
async def test_each_user_publishes_only_where_its_job_is(
    settings: Settings, topology: Topology, declared: Publisher, user: str
) -> None:
    for what, (exchange, key) in targets(topology).items():
        if what in MAY_PUBLISH[user]:
            await publish_as(settings, user, exchange, key, user_id=user)
        else:
            with pytest.raises(REFUSED):
                await publish_as(settings, user, exchange, key)
                pytest.fail(f"{user} published {what}")


@pytest.mark.parametrize("user", ["taskmgr_consumer", "taskmgr_service", "taskmgr_runner"])
async def test_nobody_but_the_manager_reads_the_progress_queue(
    settings: Settings, topology: Topology, declared: Publisher, user: str
) -> None:
    conn = await aio_pika.connect(amqp_as(settings.amqp_url, user))
    try:
        for queue in (topology.progress, topology.dead):
            ch = await conn.channel()
            q = await ch.get_queue(queue, ensure=False)
            with pytest.raises(REFUSED):
                await q.get(fail=False)
    finally:
        await conn.close()


async def test_only_runners_read_start_queues(
    settings: Settings, topology: Topology, declared: Publisher
) -> None:
    for user in ("taskmgr_consumer", "taskmgr_service"):
        conn = await aio_pika.connect(amqp_as(settings.amqp_url, user))
        try:
            ch = await conn.channel()
            q = await ch.get_queue(topology.start_queue("default"), ensure=False)
            with pytest.raises(REFUSED):
                await q.get(fail=False)
        finally:
            await conn.close()


async def test_a_message_cannot_claim_another_users_identity(
    settings: Settings, topology: Topology, declared: Publisher
) -> None:
    """RabbitMQ refuses a user_id that is not the connection's: a runner cannot write a
    report as an outside service, nor a service as a runner."""
    for user, claimed in (("taskmgr_runner", "taskmgr_service"), ("taskmgr_service", "taskmgr_runner")):
        with pytest.raises(REFUSED):
            await publish_as(settings, user, topology.reports, "", user_id=claimed)


async def test_a_downstream_consumer_binds_and_reads_its_own_queue_only(
    settings: Settings, topology: Topology, declared: Publisher
) -> None:
    got: asyncio.Queue[bytes] = asyncio.Queue()
    consumer_url = amqp_as(settings.amqp_url, "taskmgr_consumer")
    async with Consumer(url=consumer_url, topology=topology, prefetch=10, declare=False) as c:

        async def on_event(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            await m.ack()
            await got.put(m.body)

        await c.consume_events("live_game.#", on_event)  # a server-named queue
        await c.consume_queue(f"{topology.prefix}.consumer.scores", on_event, durable=False, auto_delete=True)
        await declared.publish_many([("events", "live_game.game.final", b"{}", {}, "e1")])
        async with asyncio.timeout(5):
            assert await got.get() == b"{}"


async def progress_of(
    settings: Settings, topology: Topology, bodies: list[tuple[str, bytes]]
) -> list[broker.Message]:
    """Publish each body as its user to the reports exchange; return the deliveries as
    the manager's consumer gets them (with their validated user_id)."""
    got: list[broker.Message] = []
    done = asyncio.Event()
    consumer = Consumer(url=settings.amqp_url, topology=topology, prefetch=100, name="senders")
    await consumer.__aenter__()
    progress_of.consumers.append(consumer)  # type: ignore[attr-defined]

    async def on_message(m: broker.Message) -> None:
        got.append(m)
        if len(got) == len(bodies):
            done.set()

    await consumer.consume_progress(on_message)
    for user, body in bodies:
        async with Publisher(url=amqp_as(settings.amqp_url, user), topology=topology, declare=False) as pub:
            await pub.publish_progress(body)
    async with asyncio.timeout(10):
        await done.wait()
    return got


progress_of.consumers = []  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
async def _close() -> AsyncIterator[None]:
    yield
    while progress_of.consumers:  # type: ignore[attr-defined]
        await progress_of.consumers.pop().__aexit__(None, None, None)  # type: ignore[attr-defined]


async def test_the_intake_refuses_and_counts_a_report_from_the_wrong_sender(
    engine, service, settings: Settings, topology: Topology, declared: Publisher
) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client import REGISTRY

    def rejected(kind: str) -> float:
        return REGISTRY.get_sample_value("taskmgr_progress_rejected_total", {"kind": kind}) or 0.0

    await service.create_type({"name": "box", "handler": "noop"})
    from tests.helpers import schedule

    [tid] = await schedule(service, "box", 1)
    now = datetime.now(UTC)
    beat = encode(Heartbeat(runner_id="r1", pool="default", at=now))
    service_report = encode(ServiceReport(service="photos", task_id=tid, state="RUNNING", at=now))
    messages = await progress_of(
        settings,
        topology,
        [
            ("taskmgr_runner", beat),  # fine
            ("taskmgr_service", service_report),  # fine
            ("taskmgr_service", beat),  # a service forging a runner's heartbeat
            ("taskmgr_runner", service_report),  # a runner forging a service's report
        ],
    )
    before = (rejected("heartbeat"), rejected("service"))
    settings = settings.model_copy(
        update={"runner_users": "taskmgr_runner", "service_users": "taskmgr_service"}
    )
    counts = await ProgressIntake(engine=engine, publisher=declared, settings=settings).handle_messages(
        messages
    )
    assert (counts.heartbeats, counts.service_reports, counts.rejected) == (1, 1, 2)
    assert (rejected("heartbeat") - before[0], rejected("service") - before[1]) == (1, 1)
    reasons: list[str] = []
    async with Consumer(url=settings.amqp_url, topology=topology, prefetch=10, name="dead") as c:
        arrived = asyncio.Event()

        async def on_dead(m: broker.Message) -> None:
            await m.ack()
            reasons.append(str(m.headers[REASON_HEADER]))
            if len(reasons) == 2:
                arrived.set()

        await c.consume_queue(topology.dead, on_dead, durable=True)
        async with asyncio.timeout(5):
            await arrived.wait()
    assert sorted(reasons) == [
        "sender 'taskmgr_runner' may not send service messages",
        "sender 'taskmgr_service' may not send heartbeat messages",
    ]


async def test_a_message_without_a_user_id_is_not_trusted(
    engine, settings: Settings, topology: Topology, declared: Publisher
) -> None:  # type: ignore[no-untyped-def]
    beat = encode(Heartbeat(runner_id="r1", pool="default", at=datetime.now(UTC)))
    await publish_as(settings, "guest", topology.reports, "")  # an empty body, no user_id
    got: list[broker.Message] = []
    arrived = asyncio.Event()
    async with Consumer(url=settings.amqp_url, topology=topology, prefetch=10, name="t") as c:

        async def on_message(m: broker.Message) -> None:
            got.append(m)
            arrived.set()

        await c.consume_progress(on_message)
        conn = await aio_pika.connect(settings.amqp_url)
        try:
            ch = await conn.channel(publisher_confirms=True)
            ex = await ch.get_exchange(topology.reports, ensure=False)
            got.clear()
            await ex.publish(aio_pika.Message(beat), routing_key="")
        finally:
            await conn.close()
        async with asyncio.timeout(5):
            while not any(m.body == beat for m in got):
                arrived.clear()
                await arrived.wait()
        mine = [m for m in got if m.body == beat]
        counts = await ProgressIntake(engine=engine, publisher=declared, settings=settings).handle_messages(
            mine
        )
    assert counts.rejected == 1 and counts.heartbeats == 0
