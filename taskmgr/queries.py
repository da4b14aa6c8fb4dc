"""Named queries from sql/queries.sql: "-- name --" then the SQL, as SQLAlchemy text()."""

from __future__ import annotations

import re
from functools import cache
from importlib.resources.abc import Traversable

from sqlalchemy import TextClause, text

from taskmgr.resources import sql_dir

_NAME = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


@cache
def load(path: Traversable | None = None) -> dict[str, TextClause]:
    parts = _NAME.split((path or sql_dir() / "queries.sql").read_text())
    return {name: text(sql.strip()) for name, sql in zip(parts[1::2], parts[2::2], strict=True)}


def q(name: str) -> TextClause:
    return load()[name]
