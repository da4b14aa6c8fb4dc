"""Recurrence rules: a fixed interval or a cron expression in a timezone, optionally
ending after N occurrences or at a time. Each occurrence is its own task; the next one
is written when the current one is dispatched (see manager.dispatch)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from taskmgr.errors import InvalidInput
from taskmgr.models import MisfirePolicy, Recurrence

_KEYS = {"every_s", "cron", "timezone", "ends_after", "ends_at"}


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
    if every is not None and (not isinstance(every, int | float) or isinstance(every, bool) or not every > 0):
        raise InvalidInput("recurrence.every_s", f"must be a positive number of seconds, got {every!r}")
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


def next_after(rec: Recurrence, after: datetime, *, anchor: datetime | None = None) -> datetime:
    """The first occurrence strictly after `after`. Interval rules keep to the grid of
    `anchor` (the previous due time) so that lateness does not shift later runs.
    Cron rules are evaluated in the rule's timezone, so 09:00 stays 09:00 local across
    DST changes (APScheduler's CronTrigger does the wall-clock arithmetic)."""
    if rec.every_s is not None:
        base = anchor or after
        steps = max(1, math.floor((after - base).total_seconds() / rec.every_s) + 1)
        nxt = base + timedelta(seconds=rec.every_s * steps)
        while nxt <= after:  # float rounding
            nxt += timedelta(seconds=rec.every_s)
        return nxt
    assert rec.cron is not None
    trigger = CronTrigger.from_crontab(rec.cron, timezone=ZoneInfo(rec.timezone))
    fire = trigger.get_next_fire_time(None, after + timedelta(seconds=1))
    assert fire is not None
    return fire


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
    if rec.ends_at is not None and nxt > rec.ends_at:
        return None
    return nxt
