"""Logging set-up: text for people, JSON (TASKMGR_LOG_FORMAT=json) for machines. Lines
about a task carry task_id, root_task_id, task_runner_id (runner lines) and attempt as
fields (passed with `extra=task_fields(...)`), in both formats."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from taskmgr.redact import redact_text

TASK_FIELDS = ("task_id", "root_task_id", "task_runner_id", "attempt")


def task_fields(
    task_id: Any, root_task_id: Any, attempt: int, runner_id: str | None = None
) -> dict[str, Any]:
    """The `extra=` of a log line about a task (ids as strings, so JSON shows them as is)."""
    fields: dict[str, Any] = {"task_id": str(task_id), "root_task_id": str(root_task_id), "attempt": attempt}
    if runner_id is not None:
        fields["task_runner_id"] = runner_id
    return fields


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = " ".join(f"{k}={getattr(record, k)}" for k in TASK_FIELDS if hasattr(record, k))
        return f"{line} [{tags}]" if tags else line


class RedactSecrets(logging.Filter):
    """Every URL in a line has its password and secret query values masked (a library's
    error message may quote a connection URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Root logging to `stream` (default: stderr) in the chosen format, secrets masked."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RedactSecrets())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", rename_fields={"asctime": "time"})
        )
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aio_pika", "aiormq", "apscheduler", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
