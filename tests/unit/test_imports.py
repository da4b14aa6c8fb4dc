"""What each long-lived process loads: the runner and the manager import only what they
use, so that they stay small when idle (docs/benchmarks.md, footprint). Each check runs a
fresh interpreter that goes through the process's real entry path (`taskmgr <command>`,
with the part that would start serving replaced by a stub) and lists sys.modules. Memory
itself is measured in bench/, not here."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# The entry path: `taskmgr COMMAND ...` through the real command line, with `serve` (the
# event loop that would run the process) replaced by a stub; then what the process loads
# when it starts (the runner: its handler registry), listed; then what a runner's first
# poll adds (its HTTP client), listed again.
ENTRY = textwrap.dedent(
    """
    import json, sys
    import taskmgr.cli.common as common

    def loaded():
        return sorted(name for name, module in sys.modules.items() if module is not None)

    common.serve = lambda main, settings: None
    import taskmgr.cli as cli

    args = json.loads(sys.argv[1])
    cli.main(args, standalone_mode=False)
    if args[0] == "runner":
        from taskmgr.handlers import Registry

        Registry.default()
    idle = loaded()
    if args[0] == "runner":
        import aiohttp  # what its first poll loads (runners/http.py)
    print(json.dumps({"idle": idle, "polling": loaded()}))
    """
)

# Loaded by neither process: httpx's own command-line client and what it pulls (rich,
# pygments), the simulated feed's web server, the file-reading and table-printing helpers.
NEVER = ["httpx._main", "rich", "pygments", "aiohttp.web", "task_types.feed", "yaml"]
# The runner holds no database credentials and is no manager.
RUNNER_NEVER = [*NEVER, "sqlalchemy", "asyncpg", "jsonschema", "apscheduler", "manager"]
# The manager polls no API: no HTTP client at all. It checks a payload against its type's
# JSON Schema only when one arrives (a follow-on, a schedule), so idle it has no jsonschema.
MANAGER_NEVER = [*NEVER, "httpx", "aiohttp", "runners", "jsonschema"]


def modules_of(*args: str, polling: bool = True) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", ENTRY, json.dumps(list(args))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1])["polling" if polling else "idle"])


def loaded(modules: set[str], packages: list[str]) -> list[str]:
    """The packages of `packages` present in `modules` (a package or any of its modules)."""
    return [p for p in packages if any(m == p or m.startswith(p + ".") for m in modules)]


def test_the_runner_loads_only_what_it_uses() -> None:
    modules = modules_of("runner", "--pool", "imports-check")
    assert "runners.runner" in modules and "task_types.game" in modules  # the path ran
    assert loaded(modules, RUNNER_NEVER) == []


def test_an_idle_runner_loads_no_http_client_pool() -> None:
    """aiohttp (8 MB) is loaded by a runner's first poll, not at its start."""
    modules = modules_of("runner", "--pool", "imports-check", polling=False)
    assert "runners.runner" in modules and "task_types.game" in modules
    assert loaded(modules, [*RUNNER_NEVER, "aiohttp"]) == []


def test_the_manager_loads_only_what_it_uses() -> None:
    modules = modules_of("manager")
    assert "manager.app" in modules and "task_types.daily" in modules  # the path ran
    assert loaded(modules, MANAGER_NEVER) == []


@pytest.mark.parametrize("command", [["runner"], ["manager"]])
def test_the_check_would_see_a_heavy_module(command: list[str]) -> None:
    """The check can fail: a module the entry path did load is reported."""
    modules = modules_of(*command)
    assert loaded(modules, ["click", "pydantic_settings"]) == ["click", "pydantic_settings"]


def test_httpx_without_its_command_line_client_still_works() -> None:
    """The composition root keeps httpx/_main.py out (sys.modules entry None); httpx then
    uses the stub `main` it has for an install without its [cli] extra, and its client is
    whole."""
    code = textwrap.dedent(
        """
        import sys
        import taskmgr.cli  # the composition root
        import httpx

        def reply(request):
            return httpx.Response(200, json={"path": request.url.path})

        with httpx.Client(transport=httpx.MockTransport(reply)) as client:
            body = client.get("http://feed.invalid/box").json()
        print(body["path"], callable(httpx.main), "rich" in sys.modules, "pygments" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["/box", "True", "False", "False"]
