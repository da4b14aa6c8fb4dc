"""Where the SQL lives: migrations and named queries, shipped with the package.

The repository keeps them in the top-level sql/ folder; a built wheel carries that
folder as taskmgr/sql (setup.py's build step copies it), read through importlib.resources
so an installed taskmgr needs no checkout.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path


def sql_dir() -> Traversable:
    """The installed package's sql/, or, in a checkout, the top-level sql/."""
    packaged = resources.files("taskmgr") / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"
