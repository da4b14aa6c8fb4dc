"""`taskmgr events`: the runners' events, as they are published (tail), replayed from
the events stream (tail --from-start / --since / --offset), or from the history that
the recorder keeps (list)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import click
import yaml

from taskmgr import event_store
from taskmgr.broker import BrokerError, Consumer, Topology
from taskmgr.cli.common import BadInput, Fail, parse_uuid, run, settings_of
from taskmgr.cli.output import emit, jsonable, output_option
from taskmgr.consumer import ConsumerError, EventStream, topic_matcher
from taskmgr.db import make_engine
from taskmgr.errors import InvalidInput
from taskmgr.messages import BadMessage, Event, decode_event

# An event kind (the routing key after the task type): lowercase words and dots.
KIND_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
LIST_COLUMNS = ["time", "kind", "task_type", "task_id", "runner_id", "attempt", "data"]


def parse_ago(value: str, what: str) -> timedelta:
    """'30s', '10m', '2h', '1d' as a positive timedelta, or BadInput."""
    m = _DURATION_RE.match(value.strip())
    if not m or float(m.group(1)) <= 0:
        raise BadInput(f"{what}: {value!r} is not a duration like 30s, 10m, 2h or 1d (or an ISO time)")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def parse_since(value: str | None, what: str = "--since") -> datetime | None:
    """A duration ago ('2h') or an ISO-8601 time with a timezone, or BadInput."""
    if value is None:
        return None
    if value[:1].isdigit() and "-" in value:
        try:
            t = datetime.fromisoformat(value)
        except ValueError:
            raise BadInput(f"{what}: {value!r} is not an ISO-8601 time or a duration like 2h") from None
        if t.tzinfo is None:
            raise BadInput(f"{what}: {value!r} needs a timezone (e.g. 2026-11-24T19:00:00Z)")
        return t
    return datetime.now(UTC) - parse_ago(value, what)


def check_kinds(kinds: tuple[str, ...]) -> list[str]:
    for kind in kinds:
        if not KIND_RE.match(kind):
            raise BadInput(
                f"--kind: {kind!r} is not an event kind: lowercase words joined by dots, as in score.changed "
                "(the routing key after the task type)"
            )
    return list(kinds)


def check_pattern(pattern: str) -> None:
    try:
        topic_matcher([pattern])
    except ConsumerError as exc:
        raise BadInput(f"--routing-key: {exc.problem}") from None


@click.group()
def events() -> None:
    """Events published by the runners."""


def _print(row: dict[str, Any], output: str) -> None:
    if output == "table":
        click.echo(
            f"{row['time'].isoformat(timespec='seconds')}  {row['routing_key']:<32} "
            f"task={str(row['task_id'])[:8]} runner={row['runner']} {json.dumps(row['data'])[:100]}"
        )
    elif output == "json":  # JSON Lines: one event per line, for jq and scripts
        click.echo(json.dumps(jsonable(row), separators=(",", ":")))
    else:  # a YAML document per event
        doc = yaml.safe_dump(jsonable(row), sort_keys=False, allow_unicode=True)
        click.echo("---\n" + doc.rstrip())


def _row(ev: Event, routing_key: str, offset: int | None = None) -> dict[str, Any]:
    row = {
        "time": ev.observed_at,
        "routing_key": routing_key,
        "event_id": ev.event_id,
        "task_id": ev.task_id,
        "runner": ev.task_runner_id,
        "data": ev.data,
    }
    if offset is not None:
        row["offset"] = offset
    return row


@events.command("tail")
@click.option(
    "--routing-key", default="#", show_default=True, help="Binding pattern, e.g. 'live_game.score.*'."
)
@click.option("--count", type=int, default=0, help="Stop after this many events (0: run until Ctrl-C).")
@click.option("--timeout", type=float, default=0, help="Stop after this many seconds (0: never).")
@click.option("--from-start", is_flag=True, help="Replay the events stream from its oldest event.")
@click.option(
    "--since", default=None, help="Replay the events stream from this long ago (10m, 2h) or an ISO time."
)
@click.option(
    "--offset", type=click.IntRange(min=0), default=None, help="Replay the events stream from an offset."
)
@output_option
@click.pass_context
def events_tail(
    ctx: click.Context,
    routing_key: str,
    count: int,
    timeout: float,
    from_start: bool,
    since: str | None,
    offset: int | None,
    output: str,
) -> None:
    """Print events as they arrive (a temporary queue bound to the events exchange), or,
    with --from-start, --since or --offset, replay them from the events stream (with
    each one's offset) and go on with new ones."""
    settings = settings_of(ctx)
    check_pattern(routing_key)
    starts = [s for s in (from_start or None, since, offset) if s is not None]
    if len(starts) > 1:
        raise BadInput("give at most one of --from-start, --since and --offset")
    if starts:
        start: Any = "first" if from_start else offset if offset is not None else parse_since(since)
        run(_replay(settings, routing_key, start, count, timeout, output))
        return

    async def go() -> int:
        got = 0
        done = asyncio.Event()

        async def on_event(message: Any) -> None:
            nonlocal got
            # Deliveries are handled concurrently: count before any await, so --count N
            # prints N events, not the N plus those already prefetched.
            if count and got >= count:
                return  # unacked: the temporary queue goes away with us
            try:
                ev = decode_event(message.body)
            except BadMessage as exc:
                await message.ack()
                click.echo(f"skipped a malformed event ({message.routing_key}): {exc}", err=True)
                return
            got += 1
            if count and got >= count:
                done.set()
            await message.ack()
            _print(_row(ev, message.routing_key), output)

        exchange = Topology(settings.amqp_prefix).events
        try:
            async with Consumer(
                url=settings.amqp_url, topology=Topology(settings.amqp_prefix), prefetch=100, declare=False
            ) as c:
                try:
                    await c.consume_events(routing_key, on_event)
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    raise Fail(
                        f"no exchange {exchange!r}: no manager or runner has declared it yet "
                        "(or --amqp-prefix is wrong)"
                    ) from None
                click.echo(f"listening on {exchange} for {routing_key!r}", err=True)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout or None):
                        await done.wait()
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            raise Fail(f"RabbitMQ: {exc!r}"[:300]) from None
        return got

    with contextlib.suppress(KeyboardInterrupt):
        run(go())


async def _replay(
    settings: Any, routing_key: str, start: Any, count: int, timeout: float, output: str
) -> int:
    """The events stream from `start`, filtered by `routing_key`, until --count or
    --timeout (or Ctrl-C)."""
    stream = EventStream(
        url=settings.amqp_url,
        prefix=settings.amqp_prefix,
        name="taskmgr-events-tail",
        routing_keys=[routing_key],
        start=start,
    )
    got = 0
    try:
        async with stream:
            click.echo(f"replaying {stream.stream} from {start!s} for {routing_key!r}", err=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout or None):
                    async for received in stream:
                        _print(_row(received.event, received.routing_key, received.offset), output)
                        got += 1
                        if count and got >= count:
                            break
    except BrokerError as exc:
        raise Fail(
            f"{exc} (no manager has declared the events stream yet, or --amqp-prefix is wrong)"[:300]
        ) from None
    if stream.counts.invalid:
        click.echo(f"skipped {stream.counts.invalid} events that are not valid", err=True)
    return got


@events.command("list")
@click.option("--game", default=None, help="A game: <provider>:<game_id> (e.g. nba:0022400061) or its id.")
@click.option("--task", "task_id", default=None, help="A task's events (its id).")
@click.option("--root", "root_id", default=None, help="The events of a whole task tree (the root task's id).")
@click.option("--since", default=None, help="Only events since this long ago (30m, 2h, 1d) or an ISO time.")
@click.option("--kind", "kinds", multiple=True, help="Only this kind, e.g. score.changed (repeatable).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@output_option
@click.pass_context
def events_list(
    ctx: click.Context,
    game: str | None,
    task_id: str | None,
    root_id: str | None,
    since: str | None,
    kinds: tuple[str, ...],
    limit: int,
    output: str,
) -> None:
    """Events from the history (the emitted_events hypertable the recorder writes), in
    time order: of one game, one task, or one task tree."""
    chosen = [
        name for name, v in (("--game", game), ("--task", task_id), ("--root", root_id)) if v is not None
    ]
    if len(chosen) != 1:
        raise BadInput("give exactly one of --game, --task and --root")
    after = parse_since(since)
    wanted = check_kinds(kinds)
    task = parse_uuid(task_id, "--task") if task_id is not None else None
    root = parse_uuid(root_id, "--root") if root_id is not None else None
    if game is not None:
        from task_types.games import candidate_keys

        try:
            candidate_keys(game)  # a malformed game is bad input before any connection
        except InvalidInput as exc:
            raise BadInput(str(exc)) from None

    async def go() -> list[event_store.StoredEvent]:
        engine = make_engine(settings_of(ctx).reads_url, pool_size=1, name="taskmgr-cli")
        try:
            async with engine.connect() as conn:
                if task is not None:
                    return await event_store.events_of_task(
                        conn, task, since=after, kinds=wanted, limit=limit
                    )
                if root is not None:
                    return await event_store.events_of_root(
                        conn, root, since=after, kinds=wanted, limit=limit
                    )
                from task_types.games import events_of_game, resolve_game

                assert game is not None
                key = await resolve_game(conn, game)
                return await events_of_game(conn, key, since=after, kinds=wanted, limit=limit)
        finally:
            await engine.dispose()

    rows = [_stored_row(e) for e in run(go())]
    emit(rows, output, LIST_COLUMNS)


def _stored_row(e: event_store.StoredEvent) -> dict[str, Any]:
    return {
        "time": e.time,
        "kind": e.kind,
        "task_type": e.task_type,
        "task_id": e.task_id,
        "runner_id": e.runner_id,
        "attempt": e.attempt,
        "event_id": e.event_id,
        "root_task_id": e.root_task_id,
        "version": e.version,
        "data": e.data,
    }
