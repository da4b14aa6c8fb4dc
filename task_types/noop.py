"""A handler that finishes on its first successful poll: for benchmarks and tests."""

from __future__ import annotations

from typing import ClassVar

import httpx

from taskmgr.handlers import BaseHandler, EmittedEvent, Outcome, PollContext


class NoopHandler(BaseHandler):
    name: ClassVar[str] = "noop"

    def handle(self, ctx: PollContext, response: httpx.Response) -> Outcome:
        return Outcome(events=[EmittedEvent("done", "done", {"status": response.status_code})], done=True)
