"""`taskmgr events`: the runners' events, as they are published."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aio_pika
import click
import yaml

from taskmgr.broker import Consumer, Topology
from taskmgr.cli.common import Fail, run, settings_of
from taskmgr.cli.output import jsonable, output_option
from taskmgr.messages import BadMessage, decode_event


@click.group()
def events() -> None:
    """Events published by the runners."""


@events.command("tail")
@click.option(
    "--routing-key", default="#", show_default=True, help="Binding pattern, e.g. 'live_game.score.*'."
)
@click.option("--count", type=int, default=0, help="Stop after this many events (0: run until Ctrl-C).")
@click.option("--timeout", type=float, default=0, help="Stop after this many seconds (0: never).")
@output_option
@click.pass_context
def events_tail(ctx: click.Context, routing_key: str, count: int, timeout: float, output: str) -> None:
    """Bind a temporary queue to the events exchange and print events as they arrive."""
    settings = settings_of(ctx)

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
            row = {
                "time": ev.observed_at,
                "routing_key": message.routing_key,
                "event_id": ev.event_id,
                "task_id": ev.task_id,
                "runner": ev.task_runner_id,
                "data": ev.data,
            }
            if output == "table":
                click.echo(
                    f"{row['time'].isoformat(timespec='seconds')}  {row['routing_key']:<32} "
                    f"task={str(ev.task_id)[:8]} runner={ev.task_runner_id} {json.dumps(ev.data)[:100]}"
                )
            elif output == "json":  # JSON Lines: one event per line, for jq and scripts
                click.echo(json.dumps(jsonable(row), separators=(",", ":")))
            else:  # a YAML document per event
                doc = yaml.safe_dump(jsonable(row), sort_keys=False, allow_unicode=True)
                click.echo("---\n" + doc.rstrip())

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
