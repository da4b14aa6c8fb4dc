"""Named queries from a queries.sql file: "-- name --" then the SQL, as SQLAlchemy
text(). The engine's are sql/queries.sql; a part may keep its own file the same way
(QueryFile: loaded at first use, run with driver errors wrapped in StoreError)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from importlib.resources.abc import Traversable
from typing import Any

from sqlalchemy import TextClause, text
from sqlalchemy import exc as sa_exc

from taskmgr.errors import StoreError
from taskmgr.resources import sql_dir

_NAME = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def load(path: Traversable) -> dict[str, TextClause]:
    """The queries of the file at `path`, by name."""
    parts = _NAME.split(path.read_text())
    return {name: text(sql.strip()) for name, sql in zip(parts[1::2], parts[2::2], strict=True)}


def q(name: str) -> TextClause:
    """One of the engine's queries (sql/queries.sql)."""
    return ENGINE[name]


class QueryFile:
    """The named queries of one file, read at first use. `run` executes one on the
    caller's connection (or session: the caller's transaction) and wraps a database error
    in StoreError, so no caller needs to know the driver."""

    def __init__(self, path: Callable[[], Traversable]) -> None:
        self._path = path
        self._queries: dict[str, TextClause] | None = None

    def __getitem__(self, name: str) -> TextClause:
        if self._queries is None:
            self._queries = load(self._path())
        return self._queries[name]

    async def run(
        self,
        conn: Any,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        query: TextClause | None = None,
    ) -> Any:
        """Run the named query (or `query`, made from it)."""
        try:
            return await conn.execute(self[name] if query is None else query, dict(params or {}))
        except sa_exc.DBAPIError as exc:
            raise StoreError(f"{name}: {exc.orig!r}") from exc


def in_sql_dir(filename: str) -> Callable[[], Traversable]:
    """A file of the engine's sql/ folder, found when first used."""
    return lambda: sql_dir() / filename


ENGINE = QueryFile(in_sql_dir("queries.sql"))
