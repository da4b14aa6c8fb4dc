"""`taskmgr bench`: the benchmarks (JSON on the last line of output) and the chaos day."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import click

from bench import api as api_bench
from bench import chaos, chaos_cluster, dependencies, discovery, dispatch, fleet, footprint
from bench import events as events_bench
from bench import lifecycle as lifecycle_bench
from bench import runner as runner_bench
from bench import upkeep as upkeep_bench
from taskmgr.cli.common import EXIT_FAILURE, BadInput, run, settings_of


@click.group()
def bench() -> None:
    """Benchmarks (JSON on the last line of output)."""


def _bench(
    name: str, main: Callable[..., Awaitable[Any]], help_: str, params: Iterable[click.Parameter]
) -> None:
    @bench.command(name, help=help_, params=list(params))
    @click.pass_context
    def cmd(ctx: click.Context, **kw: Any) -> None:
        click.echo(json.dumps(run(main(settings_of(ctx), **kw))))


_bench(
    "dispatch",
    dispatch.main,
    "N tasks due at one instant: throughput and lateness to a runner process.",
    [
        click.Option(["--tasks"], type=int, default=10000, show_default=True),
        click.Option(["--vs"], default="", help="Peers to compare: taskiq,procrastinate,..."),
        click.Option(
            ["--profile"], default=None, help="Write a py-spy profile (collapsed stacks) of the manager here."
        ),
    ],
)
_bench(
    "lifecycle",
    lifecycle_bench.main,
    "Tasks created at a steady rate through their whole life (claimed, taken by runner processes, "
    "RUNNING, one poll, FINISHED; a follow-on for one in ten): lateness, intake lag, CPU, WAL per task.",
    [
        click.Option(
            ["--rate"],
            type=click.FloatRange(1, 100_000),
            default=1000.0,
            show_default=True,
            help="Tasks created per second (with --find-max: the first rate tried).",
        ),
        click.Option(
            ["--minutes"],
            type=click.FloatRange(0.05, 120),
            default=1.0,
            show_default=True,
            help="How long each rate is held.",
        ),
        click.Option(
            ["--find-max"],
            is_flag=True,
            help="Search the highest rate held (every task finished, p99 lateness under 1 s).",
        ),
        click.Option(["--vs"], default="", help="Peers measured after taskmgr: taskiq,procrastinate."),
        click.Option(["--runners"], type=click.IntRange(1, 16), default=2, show_default=True),
        click.Option(
            ["--statements"],
            is_flag=True,
            help="Count the statements per task (pg_stat_statements, else the server log: slows it).",
        ),
        click.Option(
            ["--profile"], default=None, help="A folder for py-spy profiles of the manager and runners."
        ),
        click.Option(["--max-steps"], type=click.IntRange(1, 30), default=8, show_default=True),
    ],
)
_bench(
    "fleet",
    fleet.main,
    "A fleet of runner processes, one SIGKILLed: hand-over time, pollers run twice, rebalancing.",
    [
        click.Option(["--runners"], type=click.IntRange(2, 16), default=3, show_default=True),
        click.Option(["--pollers"], type=click.IntRange(1), default=10000, show_default=True, help="Each."),
        click.Option(["--interval"], type=float, default=30.0, show_default=True),
        click.Option(["--rebalance-tasks"], type=click.IntRange(1), default=1000, show_default=True),
    ],
)
_bench(
    "discovery",
    discovery.main,
    "A poll's time with N events in history against an empty history.",
    [
        click.Option(["--events"], type=int, default=10_000_000, show_default=True),
    ],
)
_bench(
    "dependencies",
    dependencies.main,
    "Claims and intake batches with N waiting tasks stored (half waiting for the other half) against "
    "none, and what releasing a task adds to the transaction that ends its dependency.",
    [
        click.Option(["--stored"], type=click.IntRange(2, 100_000_000), default=1_000_000, show_default=True),
        click.Option(["--rounds"], type=click.IntRange(1, 1000), default=9, show_default=True),
    ],
)
_bench(
    "upkeep",
    upkeep_bench.main,
    "Each periodic job of the manager with N finished tasks stored against none.",
    [
        click.Option(
            ["--finished"], type=click.IntRange(1, 100_000_000), default=1_000_000, show_default=True
        ),
        click.Option(["--active"], type=click.IntRange(1, 1_000_000), default=1000, show_default=True),
        click.Option(["--runs"], type=click.IntRange(1, 1000), default=15, show_default=True),
    ],
)
_bench(
    "runner",
    runner_bench.main,
    "One runner process polling a local box-score server.",
    [
        click.Option(["--pollers"], type=int, default=10000, show_default=True),
        click.Option(["--interval"], type=float, default=10.0, show_default=True),
        click.Option(["--seconds"], type=float, default=30.0, show_default=True),
        click.Option(
            ["--etag"],
            type=click.Choice(["both", "on", "off"]),
            default="both",
            show_default=True,
            help="Serve the box score with an ETag (304s), without, or both runs.",
        ),
    ],
)
_bench(
    "footprint",
    footprint.main,
    "Idle RSS of a manager and a runner (median of --runs), and of a runner holding N pollers "
    "(--pollers 0: not measured).",
    [
        click.Option(["--pollers"], type=click.IntRange(0, 1_000_000), default=10000, show_default=True),
        click.Option(["--runs"], type=click.IntRange(1, 100), default=1, show_default=True),
    ],
)

_bench(
    "events",
    events_bench.main,
    "The event path: recorder throughput (dedup included), replay from the stream and from the "
    "hypertable, lost and doubled events.",
    [
        click.Option(["--events"], type=click.IntRange(1, 100_000_000), default=200_000, show_default=True),
        click.Option(
            ["--duplicates"],
            type=click.FloatRange(0, 1),
            default=0.1,
            show_default=True,
            help="Copies of events published again, as a share of --events.",
        ),
        click.Option(["--recorders"], type=click.IntRange(1, 16), default=1, show_default=True),
        click.Option(["--batch"], type=click.IntRange(1, 50_000), default=5000, show_default=True),
    ],
)

_bench(
    "api",
    api_bench.main,
    "The HTTP API with N tasks stored: get and list p50/p99 at a fixed rate, create throughput, "
    "SSE fan-out to many clients.",
    [
        click.Option(
            ["--tasks"], type=click.IntRange(1000, 100_000_000), default=1_000_000, show_default=True
        ),
        click.Option(
            ["--rate"],
            type=click.FloatRange(1, 10_000),
            default=200.0,
            show_default=True,
            help="Requests/s of the get and list runs.",
        ),
        click.Option(["--seconds"], type=click.FloatRange(1, 3600), default=20.0, show_default=True),
        click.Option(["--creates"], type=click.IntRange(100, 10_000_000), default=20_000, show_default=True),
        click.Option(["--writers"], type=click.IntRange(1, 64), default=4, show_default=True),
        click.Option(
            ["--clients"],
            type=click.IntRange(1, 10_000),
            default=1000,
            show_default=True,
            help="Clients of the event stream.",
        ),
        click.Option(
            ["--api-workers"],
            type=click.IntRange(1, 64),
            default=1,
            show_default=True,
            help="Processes of the API under test (taskmgr api --workers).",
        ),
        click.Option(
            ["--event-rate"],
            type=click.FloatRange(0.1, 1000),
            default=2.0,
            show_default=True,
            help="Score events stored per second during the fan-out.",
        ),
    ],
)


@bench.command("chaos")
@click.option("--minutes", type=float, default=5.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Replay a run (printed in its output).")
@click.option(
    "--kinds",
    default="all",
    show_default=True,
    help="Fault kinds to inject, comma-separated, or all: runner, manager, broker, postgres, api, freeze, "
    "poison, alarm, bomb, reversal.",
)
@click.option(
    "--cluster",
    is_flag=True,
    help="On the cluster harness (scripts/cluster up, as root): adds the kinds node (a RabbitMQ node "
    "killed and restarted) and failover (the PostgreSQL primary killed, the replica promoted).",
)
@click.pass_context
def bench_chaos(ctx: click.Context, minutes: float, seed: int | None, kinds: str, cluster: bool) -> None:
    """A game day under faults; checks the invariants against the feed's ground truth.
    Exit 1 if one failed. Restarts PostgreSQL (needs root): not for a shared server."""
    main = chaos_cluster.main if cluster else chaos.main
    try:
        result = run(main(settings_of(ctx), minutes=minutes, seed=seed, kinds=kinds))
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    click.echo(json.dumps(result))
    if not result["ok"]:
        sys.exit(EXIT_FAILURE)
