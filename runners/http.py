"""How a poller GETs its URL: on aiohttp's connection pool directly (the default), or
through any httpx transport (tests give httpx.MockTransport).

A poll is one GET with at most two conditional headers, read to the end under a size cap,
and most polls of a live feed are 304s that nobody looks at. So the default path builds no
httpx object at all; the poller makes an httpx.Response (the handlers' type) only for a
response it hands to a handler. Compared with an httpx.AsyncClient on the same aiohttp
pool, this skips the client's layers (header merging, a cookie jar shared by every task,
auth, redirects, event hooks) and the transport's conversions: docs/benchmarks.md (runner)
has what each cost.

Neither path follows redirects: one could lead to any host, past the allow-list and the
per-host limits (a 3xx fails the poll). Neither keeps cookies. The caller bounds the whole
request with its own timeout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import httpx

if TYPE_CHECKING:
    import aiohttp

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
READ_CHUNK = 64 * 1024


class TooLarge(Exception):
    """A response body over the cap."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A response read to the end: its body decoded (Content-Encoding undone)."""

    status: int
    headers: Mapping[str, str]  # case-insensitive lookups
    body: bytes


class Fetcher(Protocol):
    async def get(self, url: httpx.URL, headers: Mapping[str, str], cap: int) -> Fetched:
        """GET `url`, reading at most `cap` bytes of body, counted after decompression (a
        gzip bomb stops at the cap, not at the end) and on the wire. Raises TooLarge past it."""
        ...

    async def aclose(self) -> None: ...


def _too_large(host: str | None, declared: str | None, cap: int) -> None:
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise TooLarge(f"{host} declares {declared} bytes; at most {cap} are read")


class AiohttpFetcher:
    """The default: aiohttp's client session, no cookies, aiohttp's own timeouts off (the
    poller's bounds the request)."""

    def __init__(self, max_connections: int = HTTP_MAX_CONNECTIONS) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            keepalive_timeout=HTTP_KEEPALIVE_S,
            ssl=httpx.create_ssl_context(),  # the same certificates as httpx's (certifi)
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers=REQUEST_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return self._session

    async def get(self, url: httpx.URL, headers: Mapping[str, str], cap: int) -> Fetched:
        session = self._session or self._open()
        async with session.get(str(url), headers=headers, allow_redirects=False) as response:
            _too_large(url.host, response.headers.get("Content-Length"), cap)
            chunks: list[bytes] = []
            size = 0
            content = response.content
            while chunk := await content.read(READ_CHUNK):
                size += len(chunk)
                if size > cap:  # decompressed: never fewer bytes than came on the wire here
                    raise TooLarge(f"{url.host} sent more than {cap} bytes (decompressed)")
                chunks.append(chunk)
            return Fetched(response.status, response.headers, b"".join(chunks))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class TransportFetcher:
    """Any httpx transport (httpx's documented transport API; tests use MockTransport)."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self._transport = transport

    async def get(self, url: httpx.URL, headers: Mapping[str, str], cap: int) -> Fetched:
        request = httpx.Request("GET", url, headers={**REQUEST_HEADERS, **headers})
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
        await self._transport.aclose()
