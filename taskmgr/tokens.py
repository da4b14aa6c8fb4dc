"""API tokens (sql/0019): made by an operator (`taskmgr tokens create`), shown once, kept
only as the SHA-256 of their secret; each has a scope, read < write < admin. The HTTP
API (manager/api) looks a presented secret up by its hash.

As taskmgr.store for the tasks: functions named after their queries (sql/api_queries.sql),
taking the connection to run on, returning frozen values; driver errors become StoreError.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from taskmgr.errors import AlreadyExists, InvalidInput, NotFound
from taskmgr.queries import QueryFile, in_sql_dir
from taskmgr.store import Conn

# What a secret starts with: a token found in a log or a repository is recognisable.
SECRET_PREFIX = "tmk_"
# Random bytes in a secret (256 bits).
SECRET_BYTES = 32
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,100}$")


class Scope(StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Scope) -> bool:
        """A token of this scope may do what `needed` allows (read < write < admin)."""
        return self.rank >= needed.rank


_RANK = {Scope.READ: 0, Scope.WRITE: 1, Scope.ADMIN: 2}


class TokenNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"no API token named {name!r} (list them with `taskmgr tokens list`)")


@dataclass(frozen=True)
class Token:
    id: uuid.UUID
    name: str
    scope: Scope
    created_at: datetime | None = None
    created_by: str = ""
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


_QUERIES = QueryFile(in_sql_dir("api_queries.sql"))
_run = _QUERIES.run


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def parse_scope(value: str) -> Scope:
    try:
        return Scope(value)
    except ValueError:
        raise InvalidInput("scope", f"{value!r} is not one of read, write, admin") from None


def _token(row: Any) -> Token:
    m = row._mapping
    return Token(
        id=m["id"],
        name=m["name"],
        scope=Scope(m["scope"]),
        created_at=m.get("created_at"),
        created_by=m.get("created_by") or "",
        revoked_at=m["revoked_at"],
        last_used_at=m["last_used_at"],
    )


async def create_token(
    conn: Conn, name: str, scope: Scope | str, *, created_by: str = ""
) -> tuple[Token, str]:
    """A new token and its secret (the only time the secret exists outside the client)."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidInput("name", f"{name!r}: 1-100 of letters, digits, _ . @ -")
    scope = parse_scope(str(scope))
    secret = new_secret()
    params = {
        "id": uuid.uuid4(),
        "name": name,
        "scope": str(scope),
        "hash": hash_secret(secret),
        "created_by": created_by,
    }
    row = (await _run(conn, "insert_token", params)).first()
    if row is None:
        raise AlreadyExists(f"an API token named {name!r} exists; revoke it or choose another name")
    return _token(row), secret


async def token_for_secret(conn: Conn, secret: str) -> Token | None:
    """The live (not revoked) token whose secret this is, or None."""
    if not secret.startswith(SECRET_PREFIX) or len(secret) > 200:
        return None
    row = (await _run(conn, "token_by_hash", {"hash": hash_secret(secret)})).first()
    if row is None or row.revoked_at is not None:
        return None
    return _token(row)


async def touch_token(conn: Conn, token_id: uuid.UUID, now: datetime) -> None:
    await _run(conn, "touch_token", {"id": token_id, "now": now})


async def revoke_token(conn: Conn, name: str, now: datetime) -> Token:
    row = (await _run(conn, "revoke_token", {"name": name, "now": now})).first()
    if row is not None:
        return _token(row)
    existing = (await _run(conn, "token_named", {"name": name})).first()
    if existing is None:
        raise TokenNotFound(name)
    return _token(existing)  # revoked already: revoking again changes nothing


async def list_tokens(conn: Conn) -> list[Token]:
    return [_token(r) for r in await _run(conn, "list_tokens", {})]
