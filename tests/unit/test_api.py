"""The HTTP API's pure parts: the checked-in OpenAPI document is the app's, scopes are
ordered, cursors and stream ids go and come back, error paths read as JSON paths."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from manager.api.errors import BadRequest, json_path
from manager.api.schemas import decode_cursor, encode_cursor
from manager.api.stream import parse_stream_id
from taskmgr.errors import InvalidInput
from taskmgr.settings import Settings
from taskmgr.tokens import Scope, hash_secret, new_secret, parse_scope

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_the_checked_in_openapi_document_is_the_apps() -> None:
    from taskmgr.cli.api import openapi_document

    app_doc = json.loads(json.dumps(openapi_document(Settings()), sort_keys=True))
    assert app_doc == json.loads(DOC.read_text()), "run: taskmgr api --openapi > docs/openapi.json"


def test_every_route_but_health_declares_the_bearer_token() -> None:
    doc = json.loads(DOC.read_text())
    open_ = {p for p, ops in doc["paths"].items() for op in ops.values() if "security" not in op}
    assert open_ == {"/healthz", "/readyz"}


@pytest.mark.parametrize(
    ("have", "need", "ok"),
    [
        ("read", "read", True),
        ("read", "write", False),
        ("write", "read", True),
        ("write", "admin", False),
        ("admin", "write", True),
        ("admin", "admin", True),
    ],
)
def test_scopes_are_ordered(have: str, need: str, ok: bool) -> None:
    assert Scope(have).allows(Scope(need)) is ok


def test_a_bad_scope_is_named() -> None:
    with pytest.raises(InvalidInput, match="scope"):
        parse_scope("root")


def test_secrets_are_random_and_only_their_hash_is_kept() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("tmk_") and len(a) > 40
    assert len(hash_secret(a)) == 32 and hash_secret(a) != hash_secret(b)


def test_cursor_round_trip_and_garbage() -> None:
    at, tid = datetime(2026, 12, 6, 19, 30, tzinfo=UTC), uuid.uuid4()
    assert decode_cursor(encode_cursor(at, tid)) == (at, tid)
    for bad in ("", "!!!", "bm90IGEgY3Vyc29y"):
        with pytest.raises(BadRequest):
            decode_cursor(bad)


def test_stream_ids() -> None:
    eid = uuid.uuid4()
    assert parse_stream_id(f"2026-12-06T19:30:00+00:00~{eid}") == (
        datetime(2026, 12, 6, 19, 30, tzinfo=UTC),
        eid,
    )
    assert parse_stream_id("2026-12-06T19:30:00~x") is None
    assert parse_stream_id("yesterday") is None


def test_json_paths() -> None:
    assert json_path(("body", "tasks", 0, "payload", "n")) == "body.tasks[0].payload.n"
    assert json_path(("query", "limit")) == "query.limit"


def test_compose_runs_the_api_as_its_own_role() -> None:
    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "compose.yaml").read_text())
    api = compose["services"]["api"]
    assert api["command"][0] == "api"
    url = api["environment"]["TASKMGR_DATABASE_URL"]
    assert url.startswith("postgresql+asyncpg://taskmgr_api:${TASKMGR_DB_PASSWORD_API:?")
    assert "TASKMGR_AMQP_URL" not in api["environment"], "the API needs no broker"
    assert api["ports"] == ["${TASKMGR_BIND:-127.0.0.1}:8080:8080"]


def _stored(n: int, key: str = "score.changed", task: uuid.UUID | None = None) -> object:
    from taskmgr.event_store import StoredEvent

    tid = task or uuid.uuid4()
    return StoredEvent(
        time=datetime(2026, 12, 6, 19, 30, tzinfo=UTC) + timedelta(seconds=n),
        event_id=uuid.uuid5(tid, str(n)),
        kind=key,
        task_type="live_game",
        task_id=tid,
        root_task_id=tid,
        runner_id="r",
        attempt=1,
        version=1,
        data={"n": n},
    )


async def test_a_client_too_far_behind_is_dropped_and_told() -> None:
    """The live stream never blocks on a slow client: one whose queue is full is dropped
    (its browser reconnects with Last-Event-ID and is replayed from the history)."""
    from manager.api import stream

    hub = stream.EventHub(engine=None, poll_s=1.0, lookback_s=1.0)  # type: ignore[arg-type]
    slow, fast = stream.Subscription(), stream.Subscription()
    hub._subs.update({slow, fast})
    for n in range(stream.CLIENT_BUFFER):
        hub._publish(_stored(n))  # type: ignore[arg-type]
        fast.queue.get_nowait()
    hub._publish(_stored(stream.CLIENT_BUFFER))  # type: ignore[arg-type]
    assert slow.dropped and slow not in hub._subs
    assert fast in hub._subs and not fast.dropped
    last = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())][-1]
    assert last is None  # the client's loop ends on it


def test_the_stream_filter() -> None:
    from manager.api.events import Filter, sse

    task = uuid.uuid4()
    e = _stored(1, task=task)
    assert Filter(None, None, None)(e)  # type: ignore[arg-type]
    assert Filter("live_game.score.changed,x.y", task, task)(e)  # type: ignore[arg-type]
    assert not Filter("live_game.game.final", None, None)(e)  # type: ignore[arg-type]
    assert not Filter(None, uuid.uuid4(), None)(e)  # type: ignore[arg-type]
    frame = sse(e)  # type: ignore[arg-type]
    assert (
        frame.startswith(b"id: 2026-12-06T19:30:01+00:00~") and b"event: live_game.score.changed\n" in frame
    )
    assert sse(e) is frame  # encoded once for every client  # type: ignore[arg-type]


def test_the_task_pages_attempts_tree_and_charts() -> None:
    from manager.api.console import _attempts, _histogram, _safe, _series, _tree
    from taskmgr.models import State, TaskEvent

    t0 = datetime(2026, 12, 6, 19, 0, tzinfo=UTC)
    tid = uuid.uuid4()

    def ev(s: int, state: State, attempt: int, **detail: object) -> TaskEvent:
        runner = "r-1" if attempt else None
        return TaskEvent(t0 + timedelta(seconds=s), tid, state, attempt, runner, "x", True, dict(detail))

    history = [
        ev(0, State.SCHEDULED, 0),
        ev(1, State.STARTED, 1, lateness_ms=12.5),
        ev(2, State.RUNNING, 1),
        ev(9, State.RETRYING, 1, reason="runner died"),
        ev(10, State.STARTED, 2, lateness_ms=3.0),
        ev(11, State.RUNNING, 2),
    ]
    attempts = _attempts(history)
    assert [(a["attempt"], a["lateness_ms"], a["state"], a["reason"]) for a in attempts] == [
        (1, 12.5, "RETRYING", "runner died"),
        (2, 3.0, "RUNNING", None),
    ]

    class T:
        def __init__(self, id: uuid.UUID, parent: uuid.UUID | None, s: int) -> None:
            self.id, self.parent_id, self.due_at = id, parent, t0 + timedelta(seconds=s)

    root, a, b, c = (uuid.uuid4() for _ in range(4))
    tree = _tree([T(c, a, 3), T(root, None, 0), T(b, root, 2), T(a, root, 1)], root)  # type: ignore[list-item]
    assert [(d, t.id) for d, t in tree] == [(0, root), (1, a), (2, c), (1, b)]

    hist = _histogram([4, 0, 2, 1])
    assert [h["pct"] for h in hist] == [100.0, 0.0, 50.0, 25.0]
    assert hist[-1]["label"].startswith("≥") and hist[0]["tick"] == "0 s"

    series = _series(
        [(t0, State.STARTED, 3), (t0, State.FINISHED, 1), (t0 + timedelta(minutes=1), State.FAILED, 2)]
    )
    assert series["top"] == 4 and [b["total"] for b in series["bars"]] == [4, 2]

    assert _safe("/tasks?x=1") == "/tasks?x=1"
    assert _safe("//evil.example/") == "/" and _safe("https://evil.example/") == "/"
