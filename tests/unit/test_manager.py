"""The manager's pure parts: the retry backoff and recurrence rules across DST."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from manager.intake import backoff_s


def test_backoff_is_capped() -> None:
    assert all(5 <= backoff_s(30, 1, 10) <= 10 for _ in range(100))


@pytest.mark.parametrize(
    ("cron", "day", "expected_utc"),
    [
        # 01:30 happens twice on the fall-back day: it fires once, the first time (EDT).
        ("30 1 * * *", (2026, 10, 31), ["2026-10-31T05:30", "2026-11-01T05:30", "2026-11-02T06:30"]),
        # 02:30 does not happen on the spring-forward day: it fires once, shifted by the
        # gap (03:30 EDT), and at 02:30 again the day after.
        ("30 2 * * *", (2026, 3, 7), ["2026-03-07T07:30", "2026-03-08T07:30", "2026-03-09T06:30"]),
    ],
)
def test_cron_rule_fires_once_on_dst_changes(
    cron: str, day: tuple[int, int, int], expected_utc: list[str]
) -> None:
    from taskmgr import recurrence
    from taskmgr.models import MisfirePolicy

    rule = recurrence.parse({"cron": cron, "timezone": "America/New_York"})
    assert rule is not None
    due = datetime(*day, tzinfo=ZoneInfo("America/New_York"))
    fires = []
    for _ in range(3):
        nxt = recurrence.next_occurrence(
            rule, occurrence=1, due_at=due, now=due, policy=MisfirePolicy.COALESCE
        )
        assert nxt is not None and nxt > due, (due, nxt)  # always forward: no loop
        fires.append(nxt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M"))
        due = nxt
    assert fires == expected_utc
