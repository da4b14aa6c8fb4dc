"""The peers' libraries, installed the first time a comparison needs them: `taskmgr
bench dispatch --vs ...` is one command on a fresh machine. What to install is the
package's own `bench` extra (pyproject.toml), read from its installed metadata, so the
list exists once; it goes into the environment that runs taskmgr (the checkout's .venv,
or wherever the wheel was installed)."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, requires

from taskmgr.errors import TaskmgrError

# The modules each peer's driver imports.
MODULES = {
    "taskiq": ("taskiq", "taskiq_aio_pika"),
    "procrastinate": ("procrastinate",),
    "apscheduler": ("apscheduler", "psycopg2"),
    "celery": ("celery",),
}


class PeersNotInstallable(TaskmgrError):
    """pip could not install the bench extra (no package index reachable, say)."""


def bench_requirements() -> list[str]:
    """The `bench` extra of the installed taskmgr distribution."""
    try:
        reqs = requires("taskmgr") or []
    except PackageNotFoundError:
        return []
    # 'taskiq>=0.11; extra == "bench"': the extra's requirements carry that marker only.
    return [r.partition(";")[0].strip() for r in reqs if r.partition(";")[2].strip() == 'extra == "bench"']


def missing(peers: list[str]) -> list[str]:
    """The modules these peers need that cannot be imported here."""
    return [m for p in peers for m in MODULES.get(p, ()) if importlib.util.find_spec(m) is None]


def ensure(peers: list[str]) -> list[str]:
    """Install the bench extra when a module these peers need is missing; returns the
    requirements installed (empty: nothing was missing)."""
    if not missing(peers):
        return []
    reqs = bench_requirements()
    if not reqs:
        raise PeersNotInstallable("taskmgr's metadata names no bench extra: install taskmgr first")
    print(f"[bench] installing the peers' libraries: {' '.join(reqs)}", file=sys.stderr, flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", *reqs], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise PeersNotInstallable(f"pip install {' '.join(reqs)} failed: {done.stderr.strip()[-500:]}")
    importlib.invalidate_caches()
    return reqs
