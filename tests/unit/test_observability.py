"""The operator's view: the task fields of log lines, and the Prometheus/Grafana files
(docs/observability) against the metrics the code registers. (The JSON lines of a real
dispatch and real polls: tests/integration/test_observability.py.)"""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import manager.metrics
import runners.metrics
from taskmgr import logs
from tests.helpers import ROOT

OBS = ROOT / "docs" / "observability"
DASHBOARD = OBS / "grafana" / "dashboards" / "taskmgr.json"
# Series Prometheus makes itself, not the code.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


# -- logs -------------------------------------------------------------------------------


def test_text_log_lines_show_the_task_fields_too() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    logs.configure("INFO", "text", stream=buf)
    try:
        fields = logs.task_fields(uuid.UUID(int=1), uuid.UUID(int=2), 3, "r-1")
        logging.getLogger("runners.poller").info("poll failed", extra=fields)
        logging.getLogger("manager.app").info("no task here")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    first, second = buf.getvalue().splitlines()
    assert first.endswith(
        f"poll failed [task_id={uuid.UUID(int=1)} root_task_id={uuid.UUID(int=2)} "
        "task_runner_id=r-1 attempt=3]"
    )
    assert second.endswith("manager.app: no task here")


# -- Prometheus and Grafana ---------------------------------------------------------------


def registered_names() -> set[str]:
    """Every series name the code's metrics can expose (a labelled metric with no child
    yet shows no sample, so the names come from each family's type)."""
    assert manager.metrics.LEADER and runners.metrics.POLLS  # imported: registered
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions,
    keywords, label names (in {} or in by/on/... lists), durations or Grafana variables."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\w+", "", s)  # Grafana variables
    found = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s):  # not the unit of 5m or 1e3
        word = m.group()
        if re.match(r"\s*\(", s[m.end() :]) or word.lower() in PROMQL_KEYWORDS:
            continue
        found.add(word)
    return found


def test_metric_names_are_read_from_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{outcome!~"ok|x"}[$__rate_interval])))'
    ) == {"a_bucket"}
    assert metric_names("sum by (state) (b and on (instance) (c == 1)) offset 5m") == {"b", "c"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels_of(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return [p for p in out if p.get("type") != "row"]


def test_dashboard_has_the_operators_panels(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "taskmgr" and dashboard["title"]
    panels = panels_of(dashboard)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    for p in panels:
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "prometheus"
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])

    def panel(words: str, *needles: str) -> None:
        """Some panel titled with all of `words` has all of `needles` in its PromQL."""
        titles = [t for t in exprs if all(w in t.lower() for w in words.split())]
        assert titles, f"no panel titled with {words!r}"
        assert any(all(n in exprs[t] for n in needles) for t in titles), f"panels {titles} lack {needles}"

    panel(
        "dispatch lateness",
        "taskmgr_dispatch_lateness_seconds_bucket",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.99,",
    )
    panel("dispatch rate", "rate(taskmgr_dispatched_total")
    panel("active pollers", "taskmgr_runner_active_pollers")
    panel("poll errors host", "taskmgr_runner_polls_total", "by (host", 'outcome!~"ok|not_modified"')
    panel("tasks state", "taskmgr_tasks")
    panel("leader", "taskmgr_leader")
    panel("dead-lettered", "taskmgr_dead_lettered_total")


def test_dashboard_promql_uses_only_registered_metrics(dashboard: dict[str, Any]) -> None:
    known = registered_names() | PROMETHEUS_OWN
    used: set[str] = set()
    for p in panels_of(dashboard):
        for t in p["targets"]:
            names = metric_names(t["expr"])
            assert names, f"{p['title']}: {t['expr']!r} names no metric"
            unknown = names - known
            assert not unknown, f"{p['title']}: {sorted(unknown)} are not registered by the code"
            used |= names
    # And the metrics are all on the dashboard.
    for name in (
        "taskmgr_dispatched_total",
        "taskmgr_dispatch_lateness_seconds_bucket",
        "taskmgr_tasks",
        "taskmgr_leader",
        "taskmgr_progress_messages_total",
        "taskmgr_dead_lettered_total",
        "taskmgr_runner_active_pollers",
        "taskmgr_runner_polls_total",
        "taskmgr_runner_poll_duration_seconds_bucket",
        "taskmgr_runner_events_published_total",
        "taskmgr_follow_ons_written_total",
    ):
        assert name in used, name


def test_prometheus_scrapes_the_manager_runner_and_recorder_services() -> None:
    config = yaml.safe_load((OBS / "prometheus.yml").read_text())
    targets: dict[str, set[str]] = {}
    for job in config["scrape_configs"]:
        found = targets.setdefault(job["job_name"], set())
        for sd in job.get("dns_sd_configs", []):
            found.update(f"{name}:{sd['port']}" for name in sd["names"])
        for static in job.get("static_configs", []):
            found.update(static["targets"])
    assert set().union(*targets.values()) == {"manager:9100", "runner:9100", "recorder:9100"}
    # The dashboard's "Runners up" counts the runner job by name.
    assert "taskmgr-runner" in targets and targets["taskmgr-runner"] == {"runner:9100"}
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for service in ("manager", "runner", "recorder"):
        assert compose["services"][service]["environment"]["TASKMGR_METRICS_PORT"] == "9100"
    assert (
        "./docs/observability/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in (compose["services"]["prometheus"]["volumes"])
    )


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./docs/observability/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./docs/observability/grafana/dashboards"] == "/var/lib/grafana/dashboards"
    prov = OBS / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert (ds["type"], ds["url"], ds["uid"], ds["access"]) == (
        "prometheus",
        "http://prometheus:9090",
        "prometheus",
        "proxy",
    )
    (provider,) = yaml.safe_load((prov / "dashboards" / "taskmgr.yaml").read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert DASHBOARD.parent.name == "dashboards" and DASHBOARD.exists()
