"""The `taskmgr` CLI against the real database and broker, in each output format."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from taskmgr.cli import main
from taskmgr.settings import Settings

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
def cli(settings: Settings):  # type: ignore[no-untyped-def]
    env = {
        "TASKMGR_DATABASE_URL": settings.database_url,
        "TASKMGR_AMQP_URL": settings.amqp_url,
        "TASKMGR_AMQP_PREFIX": settings.amqp_prefix,
        "TASKMGR_LOG_LEVEL": "WARNING",
    }

    def invoke(*args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(main, list(args), env=env, input=input, catch_exceptions=False)

    return invoke


def out(result: Result, fmt: str) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if fmt == "json" else yaml.safe_load(result.stdout)


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_types_commands(cli, fmt: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "box.yaml"
    spec.write_text(
        "name: box\nhandler: noop\npoll_interval_s: 2\npayload_schema:\n  type: object\n"
        "  required: [game_id]\n"
    )
    added = out(cli("types", "add", "-f", str(spec), "-o", fmt), fmt)
    assert (added["name"], added["poll_interval_s"]) == ("box", 2)
    out(cli("types", "add", "quick", "--handler", "noop", "--required-service", "photo", "-o", fmt), fmt)
    updated = out(cli("types", "update", "box", "--poll-interval", "4.5", "--pool", "sports", "-o", fmt), fmt)
    assert (updated["poll_interval_s"], updated["pool"]) == (4.5, "sports")
    assert [t["name"] for t in out(cli("types", "list", "-o", fmt), fmt)] == ["box", "quick"]
    assert out(cli("types", "show", "quick", "-o", fmt), fmt)["required_services"] == ["photo"]
    assert out(cli("types", "delete", "quick", "-o", fmt), fmt)["deleted_at"] is not None
    assert [t["name"] for t in out(cli("types", "list", "-o", fmt), fmt)] == ["box"]
    assert len(out(cli("types", "list", "--all", "-o", fmt), fmt)) == 2
    assert out(cli("types", "restore", "quick", "-o", fmt), fmt)["deleted_at"] is None


def test_table_output_is_the_default(cli) -> None:  # type: ignore[no-untyped-def]
    cli("types", "add", "box", "--handler", "noop")
    result = cli("types", "list")
    assert result.exit_code == 0
    assert "name" in result.stdout and "box" in result.stdout and "noop" in result.stdout


@pytest.mark.parametrize("fmt", ["table", "json", "yaml"])
def test_tasks_commands(cli, fmt: str) -> None:  # type: ignore[no-untyped-def]
    cli(
        "types",
        "add",
        "box",
        "--handler",
        "noop",
        "--payload-schema",
        '{"type": "object", "required": ["game_id"]}',
    )
    created = out(
        cli("tasks", "create", "box", "-p", '{"game_id": "g1"}', "--in", "3600", "-o", "json"), "json"
    )
    tid = created["id"]
    child = out(
        cli("tasks", "create", "box", "-p", '{"game_id": "g1"}', "--parent", tid, "-o", "json"), "json"
    )
    assert child["root_id"] == tid
    if fmt == "table":
        assert tid[:8] in cli("tasks", "get", tid).stdout
        listing = cli("tasks", "list", "--type", "box")
        assert listing.exit_code == 0 and tid in listing.stdout
        assert "SCHEDULED" in cli("tasks", "status").stdout
        assert "SCHEDULED" in cli("tasks", "history", tid).stdout
        return
    assert out(cli("tasks", "get", tid, "-o", fmt), fmt)["state"] == "SCHEDULED"
    assert [t["id"] for t in out(cli("tasks", "list", "--root", tid, "-o", fmt), fmt)] == [child["id"], tid]
    assert len(out(cli("tasks", "list", "--state", "scheduled", "--limit", "1", "-o", fmt), fmt)) == 1
    assert out(cli("tasks", "status", "-o", fmt), fmt)["SCHEDULED"] == 2
    cancelled = out(cli("tasks", "cancel", child["id"], "--reason", "no longer needed", "-o", fmt), fmt)
    assert cancelled["state"] == "CANCELLED"
    history = out(cli("tasks", "history", child["id"], "-o", fmt), fmt)
    assert [h["state"] for h in history] == ["SCHEDULED", "CANCELLED"]
    assert history[-1]["detail"] == {"reason": "no longer needed"}
    audit = out(cli("audit", tid, "-o", fmt), fmt)
    assert {a["id"] for a in audit} == {tid, child["id"]}
    logs = out(cli("logs", child["id"], "-o", fmt), fmt)
    assert [row["what"] for row in logs] == ["SCHEDULED", "CANCELLED"]
    assert out(cli("tasks", "status", "-o", fmt), fmt)["CANCELLED"] == 1


def test_paging_with_the_cursor(cli) -> None:  # type: ignore[no-untyped-def]
    cli("types", "add", "box", "--handler", "noop")
    for i in range(3):
        cli("tasks", "create", "box", "--in", str(60 * (i + 1)))
    first = cli("tasks", "list", "--limit", "2", "-o", "json")
    cursor = first.stderr.split("--after ")[1].strip().strip("'")
    rest = out(cli("tasks", "list", "--limit", "2", "--after", cursor, "-o", "json"), "json")
    assert len(json.loads(first.stdout)) == 2 and len(rest) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tasks", "get", "not-a-uuid"), "is not a UUID"),
        (("tasks", "create", "box", "-p", "{bad json"), "--payload: not valid JSON"),
        (("tasks", "create", "box", "-p", '{"x": 1}'), "payload: 'game_id' is a required property"),
        (
            ("tasks", "create", "box", "-p", '{"game_id": "1"}', "--due", "2026-01-01T10:00"),
            "needs a timezone",
        ),
        (("tasks", "create", "box", "-p", '{"game_id": "1"}', "--cron", "99 * * * *"), "recurrence.cron"),
        (("tasks", "create", "box", "-p", '{"game_id": "1"}', "--cron", "0 0 30 2 *"), "never fires"),
        (("tasks", "create", "box", "-p", '{"game_id": "1"}', "--every", "1e-7"), "recurrence.every_s"),
        (("tasks", "create", "box", "-p", '{"game_id": "1"}', "--every", "1e13"), "recurrence.every_s"),
        (("types", "add", "-f", "/nonexistent.yaml"), "No such file"),
        (("schedule", "seed", "--date", "2026-13-01"), "--date"),
        (("schedule", "seed", "--date", "2026-11-24", "--provider", "cricinfo"), "--provider"),
        (("types", "add", "Bad Name", "--handler", "noop"), "name"),
        (("types", "update", "box"), "nothing to change"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_writes_nothing(cli, args: tuple[str, ...], message: str) -> None:  # type: ignore[no-untyped-def]
    cli(
        "types",
        "add",
        "box",
        "--handler",
        "noop",
        "--payload-schema",
        '{"type": "object", "required": ["game_id"]}',
    )
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert out(cli("tasks", "status", "-o", "json"), "json")["SCHEDULED"] == 0
    assert [t["name"] for t in out(cli("types", "list", "--all", "-o", "json"), "json")] == ["box"]


def test_unknown_task_or_type_is_exit_1(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("tasks", "create", "nope")
    assert result.exit_code == 1 and "task type 'nope' does not exist" in result.stderr
    tid = str(uuid.uuid4())
    for args in (("tasks", "get", tid), ("tasks", "cancel", tid), ("audit", tid), ("logs", tid)):
        result = cli(*args)
        assert result.exit_code == 1 and f"task {tid} does not exist" in result.stderr


def test_malformed_type_file(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    result = cli("types", "add", "-f", str(bad))
    assert result.exit_code == 2 and "not valid YAML or JSON" in result.stderr
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert "expected a mapping" in cli("types", "add", "-f", str(listing)).stderr


def test_migrate_and_status(cli) -> None:  # type: ignore[no-untyped-def]
    from taskmgr.migrate import available

    latest = available()[-1].version
    result = cli("migrate")
    assert result.exit_code == 0 and f"schema up to date (version {latest})" in result.stdout
    status = out(cli("status", "-o", "json"), "json")
    assert status["schema_version"] == latest and status["leader_present"] is False


def test_check_fails_without_a_leader_and_without_rabbitmq(cli, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    result = cli("check", "--no-runners", "-o", "json")
    assert result.exit_code == 1
    checks = {c["check"]: c for c in json.loads(result.stdout)}
    assert checks["database"]["ok"] and checks["broker"]["ok"] and not checks["leader"]["ok"]
    env = {
        "TASKMGR_DATABASE_URL": settings.database_url,
        "TASKMGR_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
    }
    down = CliRunner().invoke(main, ["check", "--no-runners", "-o", "json"], env=env)
    assert down.exit_code == 1
    assert not {c["check"]: c for c in json.loads(down.stdout)}["broker"]["ok"]


def test_schedule_seed_by_hand(cli, sports_types) -> None:  # type: ignore[no-untyped-def]
    first = cli("schedule", "seed", "--date", "2026-11-24", "-o", "json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == {"date": "2026-11-24", "schedule_tasks_created": 4}
    # By hand a day is synced again (its games are never duplicated by the sync).
    again = cli("schedule", "seed", "--date", "2026-11-24", "--provider", "nba", "-o", "json")
    assert json.loads(again.stdout)["schedule_tasks_created"] == 1


@pytest.mark.usefixtures("sports_types")
def test_commands_log_only_errors_unless_asked(settings: Settings) -> None:
    """A command prints its result; its INFO lines show only with --log-level (the
    processes keep INFO by default)."""
    env = {
        "TASKMGR_DATABASE_URL": settings.database_url,
        "TASKMGR_AMQP_URL": settings.amqp_url,
        "TASKMGR_LEAGUES": "nba:nba",
    }
    seed = ["schedule", "seed", "--date", "2026-11-24", "-o", "json"]
    quiet = CliRunner().invoke(main, seed, env=env, catch_exceptions=False)
    assert quiet.exit_code == 0 and json.loads(quiet.stdout)["schedule_tasks_created"] == 1, quiet.output
    assert "daily schedule job" not in quiet.stderr
    told = CliRunner().invoke(main, ["--log-level", "INFO", *seed], env=env, catch_exceptions=False)
    assert told.exit_code == 0 and "daily schedule job: 1 schedule tasks" in told.stderr, told.stderr
