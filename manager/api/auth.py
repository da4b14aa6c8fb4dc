"""Who is asking: an API token (`Authorization: Bearer <secret>`, or the console's
cookie), looked up by the SHA-256 of its secret (taskmgr/tokens.py), with a scope that
must allow the route's (read < write < admin). No token or an unknown or revoked one:
401; a token whose scope is too low: 403.

A checked token is trusted for `api_token_cache_s` (5 s): a revocation takes that long
at most to reach a running API, and a busy client costs no lookup per request."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine

from taskmgr import tokens
from taskmgr.service import utcnow
from taskmgr.tokens import Scope, Token

COOKIE = "taskmgr_token"
# Tokens remembered at most (an attacker's stream of bad secrets must not grow it).
CACHE_MAX = 10_000

bearer = HTTPBearer(
    auto_error=False, description="An API token: `taskmgr tokens create --scope read --name NAME`"
)


@dataclass(frozen=True)
class Caller:
    token: Token

    @property
    def name(self) -> str:
        return f"api:{self.token.name}"


class Auth:
    def __init__(self, *, engine: AsyncEngine, cache_s: float) -> None:
        self._engine = engine
        self._cache_s = cache_s
        self._cache: dict[bytes, tuple[float, Token | None]] = {}

    async def token(self, secret: str) -> Token | None:
        now = time.monotonic()
        key = tokens.hash_secret(secret)  # the cache keeps no secret either
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self._cache_s:
            return hit[1]
        async with self._engine.begin() as conn:
            token = await tokens.token_for_secret(conn, secret)
            if token is not None:
                await tokens.touch_token(conn, token.id, utcnow())
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        if self._cache_s > 0:
            self._cache[key] = (now, token)
        return token

    async def caller(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None
    ) -> Caller | None:
        secret = credentials.credentials if credentials is not None else request.cookies.get(COOKIE)
        if not secret:
            return None
        token = await self.token(secret)
        return Caller(token) if token is not None else None

    def require(self, scope: Scope) -> Callable[..., Awaitable[Caller]]:
        """A route dependency: the caller, whose token's scope allows `scope`."""

        async def dependency(
            request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
        ) -> Caller:
            caller = await self.caller(request, credentials)
            if caller is None:
                raise HTTPException(
                    401,
                    "a valid API token is required (Authorization: Bearer <secret>)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if not caller.token.scope.allows(scope):
                raise HTTPException(
                    403, f"token {caller.token.name!r} has scope {caller.token.scope}; this needs {scope}"
                )
            return caller

        dependency.__name__ = f"require_{scope}"
        return dependency
