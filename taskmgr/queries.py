"""Named queries from a queries.sql file: "-- name --" then the SQL, as SQLAlchemy
text(). The engine's are sql/queries.sql; a part may keep its own file the same way."""

from __future__ import annotations

import re
from functools import cache
from importlib.resources.abc import Traversable

from sqlalchemy import TextClause, text

from taskmgr.resources import sql_dir

_NAME = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def load(path: Traversable) -> dict[str, TextClause]:
    """The queries of the file at `path`, by name."""
    parts = _NAME.split(path.read_text())
    return {name: text(sql.strip()) for name, sql in zip(parts[1::2], parts[2::2], strict=True)}


@cache
def _engine() -> dict[str, TextClause]:
    return load(sql_dir() / "queries.sql")


def q(name: str) -> TextClause:
    """One of the engine's queries (sql/queries.sql)."""
    return _engine()[name]
