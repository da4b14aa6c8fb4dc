# ruff: noqa: ASYNC230
"""The worker side of `taskmgr bench dispatch`, run as its own process:

    python -m bench.receiver --amqp-url URL --prefix P --pool bench --count N --out FILE

Consumes the pool's start queue (taskmgr.broker.Consumer.consume_start), takes the
arrival time of each AMQP message before decoding it (decode_start, as a runner does),
records (task_id, attempt, due_at, arrival) for every start order of type --type, acks,
and once it has seen --count distinct tasks writes the arrivals as JSON to --out and
exits. Prints "ready" on stdout when it consumes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from taskmgr.broker import Consumer, Message, Topology
from taskmgr.messages import decode_start


async def receive(args: argparse.Namespace) -> None:
    arrivals: list[tuple[str, int, float, float]] = []
    seen: set[str] = set()
    done = asyncio.Event()
    messages = 0

    async def on_message(message: Message) -> None:
        nonlocal messages
        at = time.time()
        batch = decode_start(message.body)
        messages += 1
        for o in batch.orders:
            if o.type != args.type:
                continue
            tid = str(o.task_id)
            arrivals.append((tid, o.attempt, o.due_at.timestamp(), at))
            seen.add(tid)
        await message.ack()
        if len(seen) >= args.count:
            done.set()

    topo = Topology(args.prefix)
    async with Consumer(url=args.amqp_url, topology=topo, prefetch=args.prefetch, name="bench-receiver") as c:
        await c.consume_start(args.pool, on_message)
        print("ready", flush=True)
        try:
            await asyncio.wait_for(done.wait(), args.timeout)
        except TimeoutError:
            print(f"receiver: timed out with {len(seen)} of {args.count} tasks", file=sys.stderr)
        await c.cancel_all()
    with open(args.out, "w") as f:
        json.dump({"arrivals": arrivals, "messages": messages}, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--amqp-url", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--pool", default="bench")
    ap.add_argument("--type", default="bench_noop")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--prefetch", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=150.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.run(receive(args))
    except ImportError:
        asyncio.run(receive(args))


if __name__ == "__main__":
    main()
