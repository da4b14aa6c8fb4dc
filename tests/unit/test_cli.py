"""The `taskmgr` CLI where it needs no services: help, parsing a recorded response, and
the secrets hygiene of `check`, help, errors and logs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner, Result

from taskmgr.cli import main
from taskmgr.settings import Settings
from tests.helpers import FIXTURES


@pytest.fixture
def cli():  # type: ignore[no-untyped-def]
    def invoke(*args: str) -> Result:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    return invoke


def test_providers_parse(cli) -> None:  # type: ignore[no-untyped-def]
    box = next((FIXTURES / "nba").glob("*boxscore_0042200123.json"))
    parsed = json.loads(cli("providers", "parse", "nba", "game", str(box)).stdout)["game"]
    assert (parsed["home_score"], parsed["away_score"], parsed["status"]) == (97, 102, "final")
    wrong = cli("providers", "parse", "nba", "schedule", str(box))
    assert wrong.exit_code == 1 and "nba: $" in wrong.stderr


def test_help_names_environment_variables() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "taskmgr.cli", "manager", "--help"], capture_output=True, text=True, check=True
    )
    assert "TASKMGR_POLL_INTERVAL" in result.stdout and "TASKMGR_METRICS_PORT" in result.stdout
    top = subprocess.run(
        [sys.executable, "-m", "taskmgr.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "TASKMGR_DATABASE_URL" in top.stdout


# -- secrets hygiene -------------------------------------------------------------------


def test_check_reports_development_passwords_against_a_remote_host() -> None:
    env = {
        "TASKMGR_DATABASE_URL": "postgresql+asyncpg://taskmgr_manager:taskmgr_manager@db.invalid:5432/taskmgr",
        "TASKMGR_AMQP_URL": "amqp://guest:guest@rabbit.invalid:5672/",
    }
    result = CliRunner().invoke(main, ["check", "--no-runners", "-o", "json"], env=env)
    assert result.exit_code == 1
    checks = {c["check"]: c for c in json.loads(result.stdout)}
    assert not checks["passwords"]["ok"]
    assert "database: user 'taskmgr_manager' on db.invalid" in checks["passwords"]["detail"]
    assert "broker: user 'guest' on rabbit.invalid" in checks["passwords"]["detail"]
    assert "taskmgr_manager:taskmgr_manager" not in result.stdout


def test_development_passwords_are_fine_on_this_machine_and_real_ones_anywhere() -> None:
    from taskmgr.health import development_passwords

    local = Settings(
        database_url="postgresql+asyncpg://postgres@127.0.0.1/x", amqp_url="amqp://guest:guest@localhost/"
    )
    assert development_passwords(local) == []
    real = Settings(
        database_url="postgresql+asyncpg://taskmgr_manager:Zq8-long-random@db.example/x",
        amqp_url="amqp://taskmgr_manager:Yx7-long-random@mq.example/",
    )
    assert development_passwords(real) == []


def test_no_password_in_help_errors_or_logs(capsys) -> None:  # type: ignore[no-untyped-def]
    import io
    import logging

    from taskmgr.logs import configure

    secret_env = {"TASKMGR_DATABASE_URL": "postgresql+asyncpg://u:s3cret-pw@127.0.0.1:1/none"}
    helped = CliRunner().invoke(main, ["--help"], env=secret_env)
    assert "s3cret-pw" not in helped.output
    failed = CliRunner().invoke(main, ["tasks", "list"], env=secret_env)
    assert failed.exit_code == 1 and "s3cret-pw" not in failed.output
    stream = io.StringIO()
    configure("INFO", "text", stream)
    logging.getLogger("t").warning("cannot connect to %s", "amqp://mq:s3cret-pw@mq.example/?apiKey=k3y")
    assert "s3cret-pw" not in stream.getvalue() and "k3y" not in stream.getvalue()
    assert "amqp://mq:***@mq.example/?apiKey=***" in stream.getvalue()


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_a_bad_first_dispatch_batch_is_a_clear_error(value: str) -> None:
    """TASKMGR_DISPATCH_FIRST_BATCH must be a positive integer: anything else stops the
    command with exit 2 and names the setting, before anything runs."""
    result = CliRunner().invoke(main, ["manager", "--help"], env={"TASKMGR_DISPATCH_FIRST_BATCH": value})
    assert result.exit_code == 2
    assert "dispatch_first_batch" in result.output
