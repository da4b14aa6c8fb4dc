"""Politeness towards API hosts: at most N requests in flight and R requests per
second per host, shared by every task of a runner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

from taskmgr.errors import InvalidInput


@dataclass(frozen=True)
class HostLimit:
    concurrency: int
    rate: float = 0.0  # requests per second; 0: no limit


def parse_host_limits(spec: str) -> dict[str, HostLimit]:
    """Parse "host=concurrency:rate,..." (rate optional, 0 = unlimited); the host may
    carry a port ("127.0.0.1:8765=4:20")."""
    limits: dict[str, HostLimit] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        host, sep, value = item.rpartition("=")
        conc, _, rate = value.partition(":")
        try:
            limit = HostLimit(int(conc), float(rate or 0))
        except ValueError:
            limit = HostLimit(0, -1)
        if not sep or not host.strip() or limit.concurrency < 1 or limit.rate < 0:
            raise InvalidInput(
                "host_limits", f"{item!r} is not like 'host=concurrency:rate' (e.g. 'api.example.com=8:20')"
            )
        limits[host.strip().lower()] = limit
    return limits


class _Host:
    __slots__ = ("interval", "next_free", "semaphore")

    def __init__(self, limit: HostLimit) -> None:
        self.semaphore = asyncio.Semaphore(limit.concurrency)
        self.interval = 1.0 / limit.rate if limit.rate > 0 else 0.0
        self.next_free = 0.0


class HostLimiter:
    def __init__(self, default: HostLimit, overrides: Mapping[str, HostLimit] | None = None) -> None:
        self._default = default
        self._overrides = {k.lower(): v for k, v in (overrides or {}).items()}
        self._hosts: dict[str, _Host] = {}

    def limit_for(self, host: str, port: int | None = None) -> HostLimit:
        host = host.lower()
        if port is not None and f"{host}:{port}" in self._overrides:
            return self._overrides[f"{host}:{port}"]
        return self._overrides.get(host, self._default)

    @asynccontextmanager
    async def slot(self, host: str, port: int | None = None) -> AsyncIterator[None]:
        """Hold one of the host's request slots, spaced by its rate."""
        key = f"{host.lower()}:{port}"
        h = self._hosts.get(key)
        if h is None:
            h = self._hosts[key] = _Host(self.limit_for(host, port))
        async with h.semaphore:
            if h.interval:
                loop = asyncio.get_running_loop()
                now = loop.time()
                at = max(now, h.next_free)
                h.next_free = at + h.interval
                if at > now:
                    await asyncio.sleep(at - now)
            yield
