"""Engines: built at the edge from settings and passed down; nothing connects at import."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def make_engine(
    database_url: str,
    *,
    pool_size: int = 5,
    name: str = "taskmgr",
    server_settings: dict[str, str] | None = None,
) -> AsyncEngine:
    return create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,  # a PostgreSQL restart leaves dead connections in the pool
        connect_args={"server_settings": {"application_name": name, **(server_settings or {})}},
    )
