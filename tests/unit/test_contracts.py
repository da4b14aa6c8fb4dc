"""The message contracts: the checked-in AsyncAPI document matches the models, and
every message a component sends validates against its schema."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import jsonschema
import pytest
import yaml

from taskmgr.messages import (
    BadMessage,
    Event,
    Heartbeat,
    asyncapi_document,
    decode_event,
    decode_progress,
    decode_start,
    encode,
)
from tests.helpers import ROOT

DOC = ROOT / "docs" / "asyncapi.yaml"


def test_checked_in_document_is_current() -> None:
    assert yaml.safe_load(DOC.read_text()) == asyncapi_document(), (
        "regenerate: python -m taskmgr.messages > docs/asyncapi.yaml"
    )


def test_messages_validate_against_the_document() -> None:
    doc = yaml.safe_load(DOC.read_text())
    registry_doc = {"components": doc["components"]}
    now = datetime.now(UTC)
    event = Event(
        event_id=uuid.uuid4(),
        event="score.changed",
        task_type="live_game",
        task_id=uuid.uuid4(),
        root_task_id=uuid.uuid4(),
        task_runner_id="r1",
        attempt=1,
        observed_at=now,
        data={"home_score": 3},
    )
    hb = Heartbeat(runner_id="r1", pool="default", at=now, tasks=[(uuid.uuid4(), 2)])
    for name, message in (("Event", event), ("Heartbeat", hb)):
        schema = {**doc["components"]["schemas"][name], **registry_doc}
        jsonschema.validate(yaml.safe_load(encode(message)), schema)
    assert decode_event(encode(event)) == event
    assert decode_progress(encode(hb)) == hb


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"kind": "start", "orders": []}', b'{"kind": "x"}'])
def test_malformed_messages_are_bad_messages(body: bytes) -> None:
    with pytest.raises(BadMessage):
        decode_start(body)
    with pytest.raises(BadMessage):
        decode_progress(body)
