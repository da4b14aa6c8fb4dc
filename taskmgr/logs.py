"""Logging set-up: text for people, JSON (TASKMGR_LOG_FORMAT=json) for machines. Lines
about a task carry task_id, root_task_id, task_runner_id and attempt as fields
(passed with `extra=`), in both formats."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

TASK_FIELDS = ("task_id", "root_task_id", "task_runner_id", "attempt")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = " ".join(f"{k}={getattr(record, k)}" for k in TASK_FIELDS if hasattr(record, k))
        return f"{line} [{tags}]" if tags else line


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
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
