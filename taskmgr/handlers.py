"""The handler contract, what a task type does with the data it polls, and the
registry that finds handlers by name.

A runner owns the loop (timing, HTTP, politeness, retries, publishing); a handler only
interprets one response at a time. That keeps handlers pure and easy to test: give it
a payload, a response and its carried state, and check what it returns.

Handlers register through the `taskmgr.handlers` entry-point group
(`name = "package.module:HandlerClass"`, built with no arguments); the built-in ones
(task_types/) register there too, so the engine knows none of them by name. A Registry
is an ordinary object built once by each process and passed down: there is no global
mutable registry for tests to reset.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:  # only in annotations: a process that polls nothing loads no HTTP client
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
    # The version of this kind's data schema (Event.version); bump it on an incompatible change.
    version: int = 1

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

    def url(self, url_template: str, payload: Mapping[str, Any]) -> str:
        """The URL to GET for this task, from its type's template and its payload. Raise
        `HandlerError` when the payload cannot fill the template."""
        ...

    def base_urls(self) -> Sequence[str]:
        """The base URLs this handler's URLs point at: their hosts are the ones a runner
        lets it call (besides TASKMGR_ALLOWED_HOSTS)."""
        ...

    def handle(self, ctx: PollContext, response: httpx.Response) -> Outcome:
        """Interpret a successful (2xx) response. Raise `HandlerError` (or
        `ParseError`) when the body cannot be understood: the tick fails and is retried.
        A 304 Not Modified never reaches the handler."""
        ...


class BaseHandler:
    """Defaults for handlers: the URL is the type's template filled from the payload,
    and no base URLs of its own (its hosts must be in TASKMGR_ALLOWED_HOSTS)."""

    name: ClassVar[str] = ""

    def url(self, url_template: str, payload: Mapping[str, Any]) -> str:
        return fill_template(url_template, payload)

    def base_urls(self) -> Sequence[str]:
        return ()

    def handle(self, ctx: PollContext, response: httpx.Response) -> Outcome:  # pragma: no cover
        raise NotImplementedError


def json_body(response: httpx.Response, provider: str) -> Any:
    """The JSON body, or a ParseError naming the provider."""
    try:
        return response.json()
    except ValueError as exc:
        raise ParseError(provider, "$", f"body is not JSON ({exc})") from exc


def fill_template(template: str, values: Mapping[str, Any]) -> str:
    """`template` (str.format syntax) filled from `values`, or a HandlerError naming
    the missing field."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise HandlerError(f"url template {template!r} needs {exc} from the payload") from exc


ENTRY_POINT_GROUP = "taskmgr.handlers"


class UnknownHandler(LookupError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        super().__init__(
            f"no handler named {name!r}; known handlers: {', '.join(sorted(known)) or 'none'}"
            f" (handlers register in the {ENTRY_POINT_GROUP!r} entry-point group)"
        )


class Registry:
    """Handlers by name."""

    def __init__(self, handlers: Iterable[Handler]) -> None:
        self._handlers = {h.name: h for h in handlers}

    @classmethod
    def default(cls) -> Registry:
        """Every handler of the `taskmgr.handlers` entry-point group, the built-in ones
        included."""
        return cls(ep.load()() for ep in entry_points(group=ENTRY_POINT_GROUP))

    def get(self, name: str) -> Handler:
        try:
            return self._handlers[name]
        except KeyError:
            raise UnknownHandler(name, self._handlers) from None

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __iter__(self) -> Iterator[Handler]:
        return iter(self._handlers.values())

    def names(self) -> list[str]:
        return sorted(self._handlers)
