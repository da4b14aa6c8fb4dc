"""How a poller GETs its URL: through httpx's transport API (the design's HTTP client),
on aiohttp's connection pool by default (httpx-aiohttp's transport), or on any httpx
transport a caller gives (tests give httpx.MockTransport).

A poll is one GET with at most two conditional headers, read to the end under a size cap,
and most polls of a live feed are 304s that nobody looks at. So a poll skips the
httpx.AsyncClient's layers (header merging, a cookie jar shared by every task, auth,
redirects, event hooks) and sends an httpx.Request to the transport itself; the poller
makes the handlers' httpx.Response only for a response it hands to a handler.
docs/benchmarks.md (runner) has what each layer cost, and what sending on aiohttp's pool
directly, without httpx, would save (not taken: httpx is the runners' client).

No redirects are followed: one could lead to any host, past the allow-list and the
per-host limits (a 3xx fails the poll). No cookies are kept. The caller bounds the whole
request with its own timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx

# Connections across all hosts: per-host limits are ours (settings.host_concurrency), so
# this only has to be large; idle ones are kept this long.
HTTP_MAX_CONNECTIONS = 20_000
HTTP_KEEPALIVE_S = 30.0
USER_AGENT = "taskmgr-runner/0.1"
# What every poll sends besides its conditional headers.
REQUEST_HEADERS: Mapping[str, str] = {
    "Accept": "*/*",
    "Accept-Encoding": "gzip, deflate",
    "User-Agent": USER_AGENT,
}


class TooLarge(Exception):
    """A response body over the cap."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A response read to the end: its body decoded (Content-Encoding undone)."""

    status: int
    headers: Mapping[str, str]  # case-insensitive lookups
    body: bytes


def poll_request(url: httpx.URL, conditional: Mapping[str, str]) -> httpx.Request:
    """A poll's GET: the common headers and the poller's conditional ones. A poller keeps it
    while its validators stay the same (every 304): building one costs ~18 us, about 5% of
    a poll's CPU (docs/benchmarks.md, runner)."""
    return httpx.Request("GET", url, headers={**REQUEST_HEADERS, **conditional})


class Fetcher(Protocol):
    async def get(self, request: httpx.Request, cap: int) -> Fetched:
        """Send `request` (a GET; the same one may be sent again), reading at most `cap`
        bytes of body, counted after decompression (a gzip bomb stops at the cap, not at
        the end) and on the wire. Raises TooLarge past it."""
        ...

    async def aclose(self) -> None: ...


def _too_large(host: str | None, declared: str | None, cap: int) -> None:
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise TooLarge(f"{host} declares {declared} bytes; at most {cap} are read")


def fast_transport(max_connections: int = HTTP_MAX_CONNECTIONS) -> httpx.AsyncBaseTransport:
    """httpx's transport API on aiohttp's connection pool (httpx-aiohttp): a fraction of
    httpx's own transport's CPU per request, and it holds up with ten thousand pollers."""
    from httpx_aiohttp import AiohttpTransport

    return AiohttpTransport(
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=HTTP_KEEPALIVE_S,
        )
    )


class TransportFetcher:
    """GETs on an httpx transport (httpx's documented transport API). `transport` is one,
    or a function that makes one at the first GET (the default's aiohttp is loaded only
    when a runner first polls: an idle runner stays small)."""

    def __init__(
        self, transport: httpx.AsyncBaseTransport | Callable[[], httpx.AsyncBaseTransport] = fast_transport
    ) -> None:
        self._transport: httpx.AsyncBaseTransport | None = None
        self._make: Callable[[], httpx.AsyncBaseTransport] | None = None
        if isinstance(transport, httpx.AsyncBaseTransport):
            self._transport = transport
        else:
            self._make = transport

    async def get(self, request: httpx.Request, cap: int) -> Fetched:
        if self._transport is None:
            assert self._make is not None
            self._transport = self._make()
        url = request.url
        response = await self._transport.handle_async_request(request)
        try:
            _too_large(url.host, response.headers.get("content-length"), cap)
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > cap or response.num_bytes_downloaded > cap:
                    raise TooLarge(f"{url.host} sent more than {cap} bytes (decompressed)")
                chunks.append(chunk)
        finally:
            await response.aclose()
        return Fetched(response.status_code, response.headers, b"".join(chunks))

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()
