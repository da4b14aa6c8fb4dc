"""The example Alertmanager webhook receiver (examples/alert_receiver.py), served on a
local port: an Alertmanager notification (version 4 JSON, as Alertmanager POSTs it)
prints one line per alert; anything else is refused with the reason and prints nothing."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator

import httpx
import pytest

from examples.alert_receiver import make_server
from tests.helpers import free_port

NOTIFICATION = {
    "version": "4",
    "groupKey": '{}:{alertname="TaskmgrPoolWithoutRunners"}',
    "status": "firing",
    "receiver": "taskmgr-webhook",
    "groupLabels": {"alertname": "TaskmgrPoolWithoutRunners"},
    "commonLabels": {"alertname": "TaskmgrPoolWithoutRunners", "severity": "critical"},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "TaskmgrPoolWithoutRunners", "severity": "critical", "pool": "sports"},
            "annotations": {"summary": "Pool sports has no live runner"},
            "startsAt": "2026-11-24T11:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "fingerprint": "a1",
        },
        {
            "status": "resolved",
            "labels": {"alertname": "TaskmgrPoolWithoutRunners", "severity": "critical", "pool": "default"},
            "annotations": {"summary": "Pool default has no live runner"},
            "startsAt": "2026-11-24T10:00:00Z",
            "endsAt": "2026-11-24T10:05:00Z",
            "fingerprint": "b2",
        },
    ],
}


@pytest.fixture
def receiver() -> Iterator[tuple[str, io.StringIO]]:
    out = io.StringIO()
    port = free_port()
    server = make_server("127.0.0.1", port, out)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}/alerts", out
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_each_alert_of_a_notification_is_printed(receiver: tuple[str, io.StringIO]) -> None:
    url, out = receiver
    r = httpx.post(url, json=NOTIFICATION)
    assert r.status_code == 200
    assert out.getvalue().splitlines() == [
        "FIRING TaskmgrPoolWithoutRunners [critical] pool=sports Pool sports has no live runner",
        "RESOLVED TaskmgrPoolWithoutRunners [critical] pool=default Pool default has no live runner",
    ]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "no list of alerts"),
        (json.dumps({"status": "firing"}).encode(), "no list of alerts"),
        (json.dumps({"alerts": [{"status": "firing"}]}).encode(), "an alert without labels"),
    ],
)
def test_what_is_not_a_notification_is_refused_and_prints_nothing(
    receiver: tuple[str, io.StringIO], body: bytes, reason: str
) -> None:
    url, out = receiver
    r = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and reason in r.text
    assert out.getvalue() == ""


def test_an_oversized_body_is_refused(receiver: tuple[str, io.StringIO]) -> None:
    url, out = receiver
    r = httpx.post(url, content=b"x" * (1 << 20 | 1))
    assert r.status_code == 413 and out.getvalue() == ""
