"""The handler contract: what a task type does with the data it polls.

A runner owns the loop (timing, HTTP, politeness, retries, publishing); a handler only
interprets one response at a time. That keeps handlers pure and easy to test: give it
a payload, a response and its carried state, and check what it returns.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Protocol, runtime_checkable

import httpx

# One namespace for every event id: uuid5(EVENT_NAMESPACE, "<task id>|<event>|<key>").
EVENT_NAMESPACE = uuid.UUID("6f1b8a4e-2f8c-4f43-9c3a-6d1c8f1d2a10")


class HandlerError(Exception):
    """A handler could not make sense of a response.

    The tick fails (the runner records the message in the task's history and tries
    again on a later tick); the runner and the other tasks go on.
    """


class ParseError(HandlerError):
    """A response of an unexpected shape: names the provider and the JSON path."""

    def __init__(self, provider: str, path: str, problem: str) -> None:
        self.provider = provider
        self.path = path
        self.problem = problem
        super().__init__(f"{provider}: {path}: {problem}")


@dataclass(frozen=True)
class EmittedEvent:
    """An event for downstream services.

    `name` is the event part of the routing key (`<task_type>.<name>`), for example
    `score.changed`. `key` identifies the observation: two polls (by any runner, any
    attempt) that see the same thing must give the same key, so the event id is stable
    and consumers can drop repeats.
    """

    name: str
    key: str
    data: Mapping[str, Any] = field(default_factory=dict)

    def event_id(self, task_id: uuid.UUID) -> uuid.UUID:
        return uuid.uuid5(EVENT_NAMESPACE, f"{task_id}|{self.name}|{self.key}")


@dataclass(frozen=True)
class FollowOn:
    """A task to schedule because of what a poll saw.

    `dedup_key` makes the write idempotent: a repeated poll (or a second runner after a
    failover) writes nothing new. It is scoped by the runner to the parent task.
    """

    type: str
    payload: Mapping[str, Any]
    dedup_key: str
    due_at: datetime | None = None  # None: due now
    delay_s: float = 0.0  # added to due_at (or now)


@dataclass(frozen=True)
class ChildSync:
    """Make the tasks filed under `scope` exactly `follow_ons` (a schedule sync).

    For each follow-on the dedup key is `<scope>/<follow_on.dedup_key>`: a missing one is
    created; one that exists and is still SCHEDULED moves to the new due time; a
    SCHEDULED one under the scope that is no longer listed is cancelled. Running the
    same sync twice changes nothing.
    """

    scope: str
    follow_ons: list[FollowOn]


@dataclass(frozen=True)
class Outcome:
    """What a handler makes of one response."""

    events: list[EmittedEvent] = field(default_factory=list)
    follow_ons: list[FollowOn] = field(default_factory=list)
    state: Mapping[str, Any] = field(default_factory=dict)
    done: bool = False
    next_interval_s: float | None = None  # None: the task type's interval
    sync: ChildSync | None = None
    # True: fetch the whole body next time (no If-None-Match / If-Modified-Since), as a
    # handler that must see a response twice to trust it needs (a 304 never reaches it).
    refetch: bool = False


@dataclass(frozen=True)
class PollContext:
    """What a handler knows about the task it serves."""

    task_id: uuid.UUID
    root_task_id: uuid.UUID
    task_type: str
    attempt: int
    payload: Mapping[str, Any]
    state: Mapping[str, Any]  # carried from the previous tick ({} on the first)
    url: str
    now: datetime
    interval_s: float  # the task type's poll interval, for handlers that adapt it


@runtime_checkable
class Handler(Protocol):
    """A task type's behaviour. Implementations are stateless; state travels in
    `PollContext.state` and `Outcome.state`."""

    name: ClassVar[str]

    def url(self, url_template: str, payload: Mapping[str, Any], base_urls: Mapping[str, str]) -> str:
        """The URL to GET for this task. `base_urls` maps provider names to the base
        URL in use (the real API or the simulated feed)."""
        ...

    def handle(self, ctx: PollContext, response: httpx.Response) -> Outcome:
        """Interpret a successful (2xx) response. Raise `HandlerError` (or
        `ParseError`) when the body cannot be understood: the tick fails and is retried.
        A 304 Not Modified never reaches the handler."""
        ...


class BaseHandler:
    """Defaults for handlers: the URL is the type's template filled from the payload
    and the provider base URLs (`{base}` is the payload's provider's base URL)."""

    name: ClassVar[str] = ""

    def url(self, url_template: str, payload: Mapping[str, Any], base_urls: Mapping[str, str]) -> str:
        provider = str(payload.get("provider", ""))
        values = {**payload, "base": base_urls.get(provider, "")}
        try:
            return url_template.format(**values)
        except (KeyError, IndexError, ValueError) as exc:
            raise HandlerError(f"url template {url_template!r} needs {exc} from the payload") from exc

    def handle(self, ctx: PollContext, response: httpx.Response) -> Outcome:  # pragma: no cover
        raise NotImplementedError


def json_body(response: httpx.Response, provider: str) -> Any:
    """The JSON body, or a ParseError naming the provider."""
    try:
        return response.json()
    except ValueError as exc:
        raise ParseError(provider, "$", f"body is not JSON ({exc})") from exc
