"""One base error; "not found" errors are also LookupErrors. Messages say what was
wrong and what to do."""

from __future__ import annotations


class TaskmgrError(Exception):
    """Base of every error taskmgr raises on purpose."""


class StoreError(TaskmgrError):
    """A database error, wrapped so callers need not know the driver."""


class NotFound(TaskmgrError, LookupError):
    pass


class TaskTypeNotFound(NotFound):
    def __init__(self, name: str, deleted: bool = False) -> None:
        self.name = name
        what = "was deleted (restore it with `taskmgr types restore`)" if deleted else "does not exist"
        super().__init__(f"task type {name!r} {what}")


class TaskNotFound(NotFound):
    def __init__(self, task_id: object) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id} does not exist")


class InvalidInput(TaskmgrError, ValueError):
    """Bad input: names the field and the problem. Nothing was written."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class Conflict(TaskmgrError):
    """The request is well formed, but the task's (or type's) current state does not
    allow it: an HTTP API answers 409. Nothing was written."""


class TaskNotWaiting(Conflict):
    """A change only a waiting task (SCHEDULED or RETRYING) may take."""

    def __init__(self, task_id: object, state: str, what: str) -> None:
        self.task_id, self.state = task_id, state
        super().__init__(
            f"task {task_id} is {state}: only a SCHEDULED or RETRYING task can be {what} "
            "(cancel it and create another, or `tasks retry` a FAILED one)"
        )


class IllegalTransition(Conflict):
    def __init__(self, task_id: object, current: str, new: str) -> None:
        self.task_id, self.current, self.new = task_id, current, new
        super().__init__(f"task {task_id}: cannot go from {current} to {new}")


class AlreadyExists(Conflict):
    pass


class SchemaMissing(TaskmgrError):
    pass


class MigrationsMissing(TaskmgrError):
    def __init__(self, where: str) -> None:
        super().__init__(
            f"no migrations (NNNN_name.sql) found in {where}: this installation of taskmgr "
            "lacks its SQL. Install it from a wheel built by `pip wheel .` (which carries sql/ "
            "as taskmgr/sql) or run it from a checkout."
        )


class TimescaleMissing(TaskmgrError):
    def __init__(self, detail: str) -> None:
        super().__init__(
            "the TimescaleDB extension is not available in this PostgreSQL "
            f"({detail}). Run ./scripts/setup.sh, which builds it from Debian's source "
            "package and preloads it, or use the timescale/timescaledb image "
            "(compose.yaml)."
        )
