"""Unit tests use no services: no PostgreSQL, no RabbitMQ. Here the fixtures that would
reach them (directly, or through `engine`, `service`, `settings`, `publisher`, ...) fail
the test instead, so the suite's database is never made for a unit test."""

from __future__ import annotations

import pytest

NO_SERVICES = "a unit test uses no services; a test that needs {} belongs in tests/integration"


@pytest.fixture(scope="session")
def database_url() -> str:
    pytest.fail(NO_SERVICES.format("PostgreSQL"), pytrace=False)


@pytest.fixture
def topology() -> None:
    pytest.fail(NO_SERVICES.format("RabbitMQ"), pytrace=False)
