"""Recurrence rules: a fixed interval or a cron expression in a timezone, optionally
ending after N occurrences or at a time. Each occurrence is its own task; the next one
is written when the current one is dispatched (see manager.dispatch)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from taskmgr.errors import InvalidInput
from taskmgr.models import MisfirePolicy, Recurrence

_KEYS = {"every_s", "cron", "timezone", "ends_after", "ends_at"}

# An interval rule between these (seconds): a shorter one would spin the manager's loop,
# a longer one is a typo (a yearly rule is a cron rule).
MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 366 * 24 * 3600.0
# A cron rule must fire within this of its first due time (a leap day's rule does; the
# 30th of February never does).
CRON_HORIZON = timedelta(days=5 * 366)
_UTC = ZoneInfo("UTC")


def parse(value: Mapping[str, Any] | Recurrence | None) -> Recurrence | None:
    """Check a recurrence given as a dict (the JSON stored on the task)."""
    if value is None or isinstance(value, Recurrence):
        return value
    if not isinstance(value, Mapping):
        raise InvalidInput("recurrence", "must be an object with every_s or cron")
    unknown = set(value) - _KEYS
    if unknown:
        raise InvalidInput("recurrence", f"unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    every, cron = value.get("every_s"), value.get("cron")
    if (every is None) == (cron is None):
        raise InvalidInput("recurrence", "give exactly one of every_s and cron")
    if every is not None and (
        not isinstance(every, int | float)
        or isinstance(every, bool)
        or not MIN_INTERVAL_S <= every <= MAX_INTERVAL_S
    ):
        raise InvalidInput(
            "recurrence.every_s",
            f"must be a number of seconds from {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g}, got {every!r}",
        )
    tz = value.get("timezone", "UTC")
    try:
        zone = ZoneInfo(str(tz))
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput("recurrence.timezone", f"unknown timezone {tz!r}") from None
    if cron is not None:
        try:
            CronTrigger.from_crontab(str(cron), timezone=zone)
        except ValueError as exc:
            raise InvalidInput("recurrence.cron", f"bad cron expression {cron!r}: {exc}") from None
    ends_after = value.get("ends_after")
    if ends_after is not None and (not isinstance(ends_after, int) or ends_after < 1):
        raise InvalidInput("recurrence.ends_after", f"must be a positive integer, got {ends_after!r}")
    ends_at = value.get("ends_at")
    if ends_at is not None:
        if isinstance(ends_at, str):
            try:
                ends_at = datetime.fromisoformat(ends_at)
            except ValueError:
                raise InvalidInput("recurrence.ends_at", f"not an ISO time: {ends_at!r}") from None
        if not isinstance(ends_at, datetime) or ends_at.tzinfo is None:
            raise InvalidInput("recurrence.ends_at", "must be a timezone-aware time")
    return Recurrence(
        every_s=float(every) if every is not None else None,
        cron=str(cron) if cron is not None else None,
        timezone=str(tz),
        ends_after=ends_after,
        ends_at=ends_at,
    )


def check_fires(rec: Recurrence, due_at: datetime) -> None:
    """A rule that will fire: `ends_at` after the first due time, and a cron rule with a
    next fire time within CRON_HORIZON. Raises InvalidInput otherwise."""
    if rec.ends_at is not None and rec.ends_at <= due_at:
        raise InvalidInput(
            "recurrence.ends_at", f"{rec.ends_at.isoformat()} is not after the due time {due_at.isoformat()}"
        )
    if rec.cron is not None:
        nxt = next_after(rec, due_at, horizon=CRON_HORIZON)
        if nxt is None:
            raise InvalidInput(
                "recurrence.cron",
                f"{rec.cron!r} never fires within {CRON_HORIZON.days // 366} years of {due_at.date()}",
            )


def to_json(rec: Recurrence) -> dict[str, Any]:
    out: dict[str, Any] = {"timezone": rec.timezone}
    if rec.every_s is not None:
        out["every_s"] = rec.every_s
    if rec.cron is not None:
        out["cron"] = rec.cron
    if rec.ends_after is not None:
        out["ends_after"] = rec.ends_after
    if rec.ends_at is not None:
        out["ends_at"] = rec.ends_at.isoformat()
    return out


def next_after(
    rec: Recurrence, after: datetime, *, anchor: datetime | None = None, horizon: timedelta | None = None
) -> datetime | None:
    """The first occurrence strictly after `after` (None: a cron rule with no fire time
    within `horizon`, default CRON_HORIZON). Interval rules keep to the grid of `anchor`
    (the previous due time) so that lateness does not shift later runs. Cron rules are
    evaluated on the wall clock of the rule's timezone, so 09:00 stays 09:00 local across
    DST changes; a wall time that occurs twice (fall back) fires once, at its first
    occurrence, and one that does not occur (spring forward) fires once, shifted by the
    gap (02:30 becomes 03:30)."""
    if rec.every_s is not None:
        base = anchor or after
        steps = max(1, math.floor((after - base).total_seconds() / rec.every_s) + 1)
        nxt = base + timedelta(seconds=rec.every_s * steps)
        while nxt <= after:  # float rounding
            nxt += timedelta(seconds=rec.every_s)
        return nxt
    assert rec.cron is not None
    zone = ZoneInfo(rec.timezone)
    # APScheduler's own DST handling fires an ambiguous time twice, and then returns the
    # second one again for every later `after` (a loop). So the rule runs on naive wall
    # time (as if UTC, which has no DST) and each wall time is placed in the zone here.
    wall_trigger = CronTrigger.from_crontab(rec.cron, timezone=_UTC)
    wall = after.astimezone(zone).replace(tzinfo=None)
    limit = wall + (horizon or CRON_HORIZON)
    while True:
        fire = wall_trigger.get_next_fire_time(None, (wall + timedelta(seconds=1)).replace(tzinfo=_UTC))
        if fire is None:
            return None
        wall = fire.replace(tzinfo=None)
        if wall > limit:
            return None
        # fold=0: the first of a repeated wall time; a wall time in a gap resolves with
        # the offset before the change, i.e. shifted forward by the gap.
        aware = wall.replace(tzinfo=zone, fold=0)
        if aware > after:
            return aware.astimezone(_UTC)
        # This wall time fired already, before the clocks went back: the next one.


def next_occurrence(
    rec: Recurrence,
    *,
    occurrence: int,
    due_at: datetime,
    now: datetime,
    policy: MisfirePolicy,
) -> datetime | None:
    """When the occurrence after `occurrence` (due at `due_at`, dispatched `now`) is
    due, or None when the rule has ended. catch_up keeps every slot; coalesce and skip
    go to the first slot after now."""
    if rec.ends_after is not None and occurrence >= rec.ends_after:
        return None
    after = due_at if policy is MisfirePolicy.CATCH_UP else max(due_at, now)
    nxt = next_after(rec, after, anchor=due_at)
    if nxt is None:
        raise InvalidInput("recurrence.cron", f"{rec.cron!r} fires no more")
    if rec.ends_at is not None and nxt > rec.ends_at:
        return None
    return nxt


def next_occurrence_row(r: Mapping[str, Any], due_at: datetime) -> dict[str, Any]:
    """The task row of the occurrence after `r` (a claimed row, or any mapping with
    task_id, type, payload, root_id, recurrence, occurrence), due at `due_at`. Written
    when `r` is dispatched, or when it is cancelled before (TaskService.cancel)."""
    new_id = uuid.uuid4()
    return {
        "id": new_id,
        "type": r["type"],
        "payload": r["payload"],
        "due_at": due_at,
        "parent_id": r["task_id"],
        "root_id": r["root_id"],
        # The successor of this occurrence: a repeated claim cannot write it twice.
        "dedup_key": f"{r['task_id']}:next",
        "recurrence": r["recurrence"],
        "occurrence": r["occurrence"] + 1,
        "created_by": "recurrence",
        # What people named it and its priority carry on; a recurring task has no dependencies.
        "name": r.get("name"),
        "description": r.get("description"),
        "priority": r.get("priority", 0),
    }
