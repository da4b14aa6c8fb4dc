"""The README's first command runs to its summary: `taskmgr demo` on a quicker clock
(scripts/demo runs the same command with the default 3-minute day)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from taskmgr.settings import Settings
from tests.helpers import free_port

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_demo_runs_to_its_summary(settings: Settings) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMGR_")}
    env.update(
        {
            "TASKMGR_DATABASE_URL": settings.database_url,
            "TASKMGR_AMQP_URL": settings.amqp_url,
            "TASKMGR_DEMO_FEED_PORT": str(free_port()),
            "TASKMGR_DEMO_API_PORT": str(free_port()),
        }
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "taskmgr.cli",
            "demo",
            "--games",
            "1",
            "--period-s",
            "1.5",
            "--spread-s",
            "5",
            "--minutes",
            "4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    for provider in ("nba", "espn", "mlb", "nhl"):
        assert f"{provider}:" in out and "live_game.game.final" in out
    assert "summary" in out and "dispatch lateness" in out
    assert "console: http://127.0.0.1:" in out and "tmk_" in out
    totals = json.loads(out.strip().splitlines()[-1])
    assert totals["games_final"] == 4
    assert totals["events"]["game.final"] == 4 and totals["events"]["game.started"] == 4
    # Every event on the exchange (game and lifecycle) stored once by the recorder.
    assert totals["events_stored"] == totals["events_emitted"] > 100
    assert totals["events_stored_twice"] == 0
