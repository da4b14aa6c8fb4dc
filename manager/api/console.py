"""The web console (pages come in the next commit)."""

from __future__ import annotations

from typing import Any


def install(app: Any, api: Any) -> None:
    """No pages yet."""
