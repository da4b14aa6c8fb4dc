"""`taskmgr bench lifecycle` at a small rate: the JSON's shape, and every task created
(roots and follow-ons) went its whole way to FINISHED. A behaviour check, not a timing one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_bench_lifecycle_runs_every_task_to_the_end_and_reports_its_figures() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "taskmgr.cli", "bench", "lifecycle", "--rate", "20", "--minutes", "0.15"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "lifecycle" and result["machine"]["nproc"] >= 1
    own = result["taskmgr"]
    roots = own["created"]
    assert roots == 180  # 20/s for 9 s
    # One root in ten files a follow-on; the roots created in the window's last second may
    # file theirs after it closed, so the window holds at least the others'.
    assert roots + roots // 10 - 2 <= own["tasks_in_window"] <= roots + roots // 10
    assert own["unfinished"] == 0 and own["finished_of_those"] == own["tasks_in_window"]
    for key in (
        "lateness_started_ms",
        "lateness_first_poll_ms",
        "intake_lag_running_ms",
        "intake_lag_finished_ms",
    ):
        assert own[key]["n"] == own["tasks_in_window"] and own[key]["p50"] <= own[key]["p99"]
    assert set(own["cpu_us_per_task"]) >= {"manager", "runners", "postgres", "rabbitmq", "box_server"}
    assert own["rss_mb"]["manager"] > 0 and len(own["rss_mb"]["runners"]) == 2
    pg = own["postgres"]
    assert pg["wal_bytes_per_task"] > 0
    assert pg["rows_per_task_by_table"]["tasks"]["inserted"] > 0
    assert isinstance(own["held"], bool)
