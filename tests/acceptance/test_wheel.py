"""The product as users get it: built into a wheel, installed in a fresh virtualenv, run
from outside the checkout against a fresh database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from taskmgr.migrate import recreate_database, with_database
from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    """No TASKMGR_ settings and no PYTHONPATH: nothing of the checkout leaks in."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TASKMGR_", "PYTHON"))}


@pytest.mark.timeout(600)
async def test_the_installed_wheel_migrates_a_fresh_database_and_runs(
    database_url: str, tmp_path: Path
) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    [wheel] = wheels.glob("taskmgr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("taskmgr/sql/"))
    assert "taskmgr/sql/queries.sql" in shipped and "taskmgr/sql/0001_initial.sql" in shipped
    assert len(shipped) == len(list((ROOT / "sql").glob("*.sql")))

    # A fresh virtualenv; its dependencies come from this one's site-packages (a .pth
    # line adds the folder without running its .pth files, so the editable checkout
    # install of taskmgr is not seen), the package itself from the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd=tmp_path, env=clean_env())
    purelib = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
            env=clean_env(),
        ).stdout.strip()
    )
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        cwd=tmp_path,
        env=clean_env(),
    )
    # After the install: pip would otherwise take this environment's taskmgr for it.
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    url = with_database(database_url, database_url.rpartition("/")[2] + "_wheel")
    await recreate_database(url, migrated=False)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**clean_env(), "TASKMGR_DATABASE_URL": url}

    def taskmgr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(venv / "bin" / "taskmgr"), *args], cwd=outside, env=env, capture_output=True, text=True
        )

    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import taskmgr; print(taskmgr.__file__)"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(venv)), where
    first = taskmgr("migrate")
    assert first.returncode == 0, first.stderr
    # The engine's migrations and the sports part's, from the wheel's two packages.
    sql = [*(ROOT / "sql").glob("[0-9]*.sql"), *(ROOT / "task_types" / "sql").glob("[0-9]*.sql")]
    versions = sorted(p.name[:4] for p in sql)
    assert first.stdout.startswith(f"applied {', '.join(versions)}"), first.stdout
    again = taskmgr("migrate")
    assert again.returncode == 0 and "up to date" in again.stdout
    types = taskmgr("types", "list", "-o", "json")
    assert types.returncode == 0, types.stderr
    assert {"live_game", "schedule"} <= {t["name"] for t in json.loads(types.stdout)}

    # The peers of the comparison install themselves the first time (the bench extra,
    # from the installed package's metadata), into the environment taskmgr runs from.
    def importable(module: str) -> bool:
        probe = [str(venv / "bin" / "python"), "-c", f"import {module}"]
        return subprocess.run(probe, env=env, capture_output=True).returncode == 0

    assert not importable("taskiq_aio_pika"), "the test needs an environment without the peers"
    compared = taskmgr("bench", "dispatch", "--tasks", "200", "--vs", "taskiq")
    assert compared.returncode == 0, compared.stderr[-2000:]
    result = json.loads(compared.stdout.strip().splitlines()[-1])
    assert "taskiq>=0.11" in result["installed"], result.get("installed")
    assert result["taskiq"]["received"] == 200 and result["taskmgr"]["received"] == 200, result
    assert importable("taskiq_aio_pika") and importable("celery") and importable("procrastinate")
