"""Where the SQL lives: migrations and named queries, shipped with the packages.

The engine's are in the repository's top-level sql/ folder; a built wheel carries that
folder as taskmgr/sql (setup.py's build step copies it). Parts that stand on the engine
add migrations of their own: a `taskmgr.migrations` entry point names a package whose
sql/ folder holds them (the sports part: task_types/sql). All are read through
importlib.resources, so an installed taskmgr needs no checkout.
"""

from __future__ import annotations

from importlib import resources
from importlib.metadata import entry_points
from importlib.resources.abc import Traversable
from pathlib import Path

MIGRATIONS_ENTRY_POINT_GROUP = "taskmgr.migrations"


def sql_dir() -> Traversable:
    """The installed package's sql/, or, in a checkout, the top-level sql/."""
    packaged = resources.files("taskmgr") / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


def migration_dirs() -> list[Traversable]:
    """The engine's sql/ and every registered part's."""
    parts = sorted(entry_points(group=MIGRATIONS_ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    return [sql_dir(), *(resources.files(ep.value) / "sql" for ep in parts)]
