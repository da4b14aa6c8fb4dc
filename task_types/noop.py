"""A handler that finishes on its first successful poll: for benchmarks and tests.

A payload may name one follow-on task, `"then": {"type": "...", "payload": {...}}`: it is
scheduled (due now) with the report that finishes the task, as a game's handler files its
period-score task (`taskmgr bench lifecycle` gives one task in ten a follow-on this way)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import httpx

from taskmgr.handlers import BaseHandler, EmittedEvent, FollowOn, HandlerError, Outcome, PollContext


class NoopHandler(BaseHandler):
    name: ClassVar[str] = "noop"

    def handle(self, ctx: PollContext, response: httpx.Response) -> Outcome:
        then = ctx.payload.get("then")
        return Outcome(
            events=[EmittedEvent("done", "done", {"status": response.status_code})],
            follow_ons=[] if then is None else [_follow_on(then)],
            done=True,
        )


def _follow_on(then: Any) -> FollowOn:
    if not (
        isinstance(then, Mapping)
        and isinstance(then.get("type"), str)
        and isinstance(then.get("payload", {}), Mapping)
    ):
        raise HandlerError('payload "then" must be {"type": "<task type>", "payload": {...}}')
    return FollowOn(type=then["type"], payload=dict(then.get("payload", {})), dedup_key="then")
