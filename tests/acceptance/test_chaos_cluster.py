"""The one-minute chaos game day on the cluster harness (`taskmgr bench chaos --cluster`):
the single-machine faults that do not touch the machine's own services, plus RabbitMQ
nodes SIGKILLed (the start queue's leader among them) and restarted, and the PostgreSQL
primary stopped at once with the replica promoted and the old primary rejoined. Same
invariants. Marked `cluster` (scripts/test --slow): about 1 min 45 s, plus the harness's
start (about 80 s) when it is not up yet."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from bench.chaos_cluster import CLUSTER_KINDS
from bench.cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.mark.timeout(900)
async def test_one_minute_chaos_game_day_on_the_cluster(cluster: Cluster) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMGR_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskmgr.cli",
        "bench",
        "chaos",
        "--cluster",
        "--minutes",
        "1",
        "--seed",
        "11",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert all(result["faults"].get(kind, 0) >= 2 for kind in CLUSTER_KINDS), result["faults"]
    assert result["cluster"]["node_kills"] >= 2 and result["cluster"]["failovers"] >= 2
    assert any("the leader of" in f["what"] for f in result["fault_log"] if f["kind"] == "node")
    assert result["ok"], json.dumps(result["invariants"], indent=1)
    assert proc.returncode == 0
