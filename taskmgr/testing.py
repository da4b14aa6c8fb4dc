"""Support for the test suite and the benchmarks, which both run the product against the
real services: ports, URLs under the least-privilege roles and users, waiting for a
condition. Nothing here is used by the product itself."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_role(database_url: str, role: str) -> str:
    """The database URL for one of the roles of sql/0003 (trust auth on dev machines)."""
    return re.sub(r"//[^@/]*@", f"//{role}@", database_url)


def amqp_as(url: str, user: str) -> str:
    """The broker URL for one of scripts/setup.sh's users (development passwords)."""
    return re.sub(r"//[^@/]*@", f"//{user}:{user}@", url)


async def wait_for(
    predicate: Callable[[], Awaitable[Any]], timeout: float = 10.0, what: str = "", *, every: float = 0.05
) -> Any:
    """Poll an async predicate until it is truthy and return its value; TimeoutError
    (naming `what`) after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                value = await predicate()
                if value:
                    return value
                await asyncio.sleep(every)
    except TimeoutError:
        raise TimeoutError(f"not within {timeout} s: {what or predicate}") from None
