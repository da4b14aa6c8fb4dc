"""The TaskRunner process: one periodic coroutine per task it holds."""

from runners.runner import TaskRunner, run_runner

__all__ = ["TaskRunner", "run_runner"]
