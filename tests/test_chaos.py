"""The one-minute chaos game day (bench/chaos.py): runners and the leading manager
SIGKILLed, the services' RabbitMQ connections closed, PostgreSQL restarted, API
faults; the invariants are checked against the simulated feed's ground truth."""

from __future__ import annotations

import json

import pytest

from bench import chaos
from taskmgr.settings import Settings

pytestmark = pytest.mark.slow


@pytest.mark.timeout(400)
async def test_one_minute_chaos_game_day(settings: Settings) -> None:
    result = await chaos.main(settings, minutes=1.0, seed=20261124)
    assert all(result["faults"].get(kind, 0) >= 2 for kind in chaos.KINDS), result["faults"]
    assert result["ok"], json.dumps(result["invariants"], indent=1)
