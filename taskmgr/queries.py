"""Named queries from sql/queries.sql: "-- name --" then the SQL, as SQLAlchemy text()."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from sqlalchemy import TextClause, text

QUERIES_FILE = Path(__file__).resolve().parent.parent / "sql" / "queries.sql"
_NAME = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


@cache
def load(path: Path = QUERIES_FILE) -> dict[str, TextClause]:
    parts = _NAME.split(path.read_text())
    return {name: text(sql.strip()) for name, sql in zip(parts[1::2], parts[2::2], strict=True)}


def q(name: str) -> TextClause:
    return load()[name]
