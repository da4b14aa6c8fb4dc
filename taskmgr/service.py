"""TaskService: the one way to write tasks and task types.

`schedule(session, ...)` joins the caller's transaction (invariant 3 in docs/design.md): nothing it writes
survives the caller's rollback. Everything else opens its own transaction on the engine.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from taskmgr import recurrence as recur
from taskmgr import store, upkeep, waiting
from taskmgr.errors import (
    AlreadyExists,
    InvalidInput,
    TaskNotFound,
    TaskTypeNotFound,
)
from taskmgr.messages import MAX_PAYLOAD_BYTES, TypeChange
from taskmgr.models import (
    PRIORITY_RANGE,
    TYPE_FIELDS,
    CurrentState,
    DependencyPolicy,
    Recurrence,
    Scheduled,
    State,
    Task,
    TaskEvent,
    TaskType,
    TaskTypeFields,
    Transition,
)
from taskmgr.service_changes import TaskChanges

if TYPE_CHECKING:  # jsonschema is loaded at the first payload checked: an idle manager has none
    import jsonschema

# A task due within this of now wakes the manager instead of waiting for its next poll.
WAKEUP_HORIZON_S = waiting.WAKEUP_HORIZON_S
# The longest name and description of a task (sql/0015 checks them too).
MAX_NAME = 200
MAX_DESCRIPTION = 4000


def utcnow() -> datetime:
    return datetime.now(UTC)


def _spec_error(exc: ValidationError) -> InvalidInput:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "task type"
    return InvalidInput(where, err["msg"])


def check_type_spec(values: Mapping[str, Any]) -> TaskType:
    try:
        spec = TaskTypeFields.model_validate(dict(values))
    except ValidationError as exc:
        raise _spec_error(exc) from None
    if spec.backoff_max_s < spec.backoff_base_s:
        raise InvalidInput("backoff_max_s", "must be at least backoff_base_s")
    return TaskType.model_construct(**spec.model_dump())


@dataclass(frozen=True)
class NewTask:
    """One task to schedule (for `schedule_many`)."""

    type: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    due_at: datetime | None = None  # None: now
    dedup_key: str | None = None
    parent_id: uuid.UUID | None = None
    root_id: uuid.UUID | None = None  # None: the parent's root, or the task itself
    recurrence: Mapping[str, Any] | Recurrence | None = None
    created_by: str = ""
    occurrence: int = 1
    name: str | None = None
    description: str | None = None
    priority: int = 0  # among tasks due at the same time, higher is claimed first
    depends_on: Sequence[uuid.UUID] = ()  # tasks it waits for (see taskmgr.waiting)
    on_dependency_failure: DependencyPolicy | str = DependencyPolicy.FAIL
    id: uuid.UUID | None = None  # None: a new one; given, tasks of one call can wait for it


def check_task_fields(t: NewTask, where: str = "") -> dict[str, Any]:
    """A new task's name, description, priority and dependencies, checked: the columns
    they fill. InvalidInput names the field."""
    for name, value, most in (("name", t.name, MAX_NAME), ("description", t.description, MAX_DESCRIPTION)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InvalidInput(f"{where}{name}", "must be a non-blank string (or left out)")
        if value is not None and len(value) > most:
            raise InvalidInput(f"{where}{name}", f"{len(value)} characters; at most {most}")
    low, high = PRIORITY_RANGE
    priority = 0 if t.priority is None else t.priority  # None: the default, as left out
    if isinstance(priority, bool) or not isinstance(priority, int) or not low <= priority <= high:
        raise InvalidInput(f"{where}priority", f"must be an integer from {low} to {high}: {priority!r}")
    try:
        policy = DependencyPolicy(t.on_dependency_failure or DependencyPolicy.FAIL)
    except ValueError:
        choices = ", ".join(p.value for p in DependencyPolicy)
        problem = f"one of {choices}, not {t.on_dependency_failure!r}"
        raise InvalidInput(f"{where}on_dependency_failure", problem) from None
    depends_on = waiting.check_depends_on(t.depends_on, where)
    if depends_on and t.recurrence is not None:
        raise InvalidInput(f"{where}depends_on", "a recurring task cannot wait for other tasks")
    return {
        "name": t.name,
        "description": t.description,
        "priority": priority,
        "depends_on": depends_on,
        "on_dependency_failure": policy,
    }


@dataclass(frozen=True)
class SyncResult:
    created: int
    moved: int
    cancelled: int
    unchanged: int


class TaskService(TaskChanges):
    """The one owner of the rules of tasks and task types: every command, the manager's
    intake and the HTTP API change them through it. The operator's changes of one task
    (cancel, retry, reschedule, update_payload) are in taskmgr/service_changes.py."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        clock: Callable[[], datetime] = utcnow,
        known_handlers: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._known_handlers = known_handlers
        self._validators: dict[tuple[str, datetime | None], jsonschema.protocols.Validator] = {}

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    def session(self) -> AsyncSession:
        return AsyncSession(self._engine, expire_on_commit=False)

    # -- task types ------------------------------------------------------------------

    def _check_handler(self, t: TaskType) -> None:
        if self._known_handlers is not None and t.handler not in self._known_handlers():
            known = ", ".join(sorted(self._known_handlers()))
            raise InvalidInput("handler", f"no handler named {t.handler!r} (known: {known})")

    async def create_type(self, values: Mapping[str, Any] | TaskType) -> TaskType:
        t = check_type_spec(_type_values(values))
        self._check_handler(t)
        async with self._engine.begin() as conn:
            created = await store.insert_type(conn, t)
        if created is None:
            raise AlreadyExists(f"task type {t.name!r} exists; use update to change it")
        return created

    async def update_type(self, name: str, /, **changes: Any) -> TaskType:
        async with self._engine.begin() as conn:
            current = await store.get_type(conn, name, for_update=True)
            if current is None:
                raise TaskTypeNotFound(name)
            values = _type_values(current)
            unknown = set(changes) - set(TYPE_FIELDS)
            if unknown or "name" in changes:
                bad = sorted(unknown | ({"name"} & set(changes)))
                raise InvalidInput(bad[0], "cannot be changed (unknown or the key)")
            t = check_type_spec({**values, **changes})
            self._check_handler(t)
            updated = await store.update_type(conn, t)
            assert updated is not None
            # At commit, the leader broadcasts the values running pollers take at their
            # next tick (the rest, such as the URL or the pool, apply from the next dispatch).
            await store.notify_leader(conn, TypeChange.of(updated))
            return updated

    async def get_type(self, name: str, *, include_deleted: bool = False) -> TaskType:
        async with self._engine.connect() as conn:
            t = await store.get_type(conn, name)
        if t is None or (t.deleted_at is not None and not include_deleted):
            raise TaskTypeNotFound(name, deleted=t is not None)
        return t

    async def list_types(self, *, include_deleted: bool = False) -> list[TaskType]:
        async with self._engine.connect() as conn:
            return await store.list_types(conn, include_deleted=include_deleted)

    async def delete_type(self, name: str) -> TaskType:
        """Soft delete: the row stays (its tasks keep their history and those already
        scheduled still run); new tasks of this type are refused."""
        return await self._set_deleted(name, True)

    async def restore_type(self, name: str) -> TaskType:
        return await self._set_deleted(name, False)

    async def _set_deleted(self, name: str, deleted: bool) -> TaskType:
        async with self._engine.begin() as conn:
            t = await store.set_type_deleted(conn, name, deleted)
        if t is None:
            raise TaskTypeNotFound(name)
        return t

    # -- scheduling --------------------------------------------------------------------

    async def schedule(
        self,
        session: AsyncSession,
        type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        due_at: datetime | None = None,
        dedup_key: str | None = None,
        parent_id: uuid.UUID | None = None,
        root_id: uuid.UUID | None = None,
        recurrence: Mapping[str, Any] | Recurrence | None = None,
        created_by: str = "",
        name: str | None = None,
        description: str | None = None,
        priority: int = 0,
        depends_on: Sequence[uuid.UUID] = (),
        on_dependency_failure: DependencyPolicy | str = DependencyPolicy.FAIL,
    ) -> Scheduled:
        """Schedule one task in the caller's transaction (nothing is committed here).

        name, description: for people (optional). priority: among tasks due at the same
        time, higher is claimed first (-32768..32767, default 0). depends_on: tasks it
        waits for; it is due (at due_at, or when the last ends if that is later) once
        every one FINISHED. A dependency that ends FAILED or CANCELLED fails it
        (on_dependency_failure="fail", the default) or counts as ended ("run").

        Raises InvalidInput (bad payload, due time, recurrence, name, priority, a
        dependency that does not exist), TaskTypeNotFound (unknown or deleted type); on
        error nothing is written.
        """
        new = NewTask(
            type=type,
            payload=payload or {},
            due_at=due_at,
            dedup_key=dedup_key,
            parent_id=parent_id,
            root_id=root_id,
            recurrence=recurrence,
            created_by=created_by,
            name=name,
            description=description,
            priority=priority,
            depends_on=depends_on,
            on_dependency_failure=on_dependency_failure,
        )
        return (await self.schedule_many(session, [new]))[0]

    async def schedule_many(
        self, session: Any, tasks: Sequence[NewTask], *, types: dict[str, TaskType] | None = None
    ) -> list[Scheduled]:
        """Schedule many tasks with one statement per table, in the caller's transaction
        (a session or a connection). All are checked first: one bad task writes none.
        A task may wait for another of the same call (give that one an `id`).

        types: the task types this transaction has read, by name, filled in as more are
        read (a caller's short-lived cache: the intake keeps one per batch)."""
        now = self._clock()
        types = {} if types is None else types
        rows: list[dict[str, Any]] = []
        for i, t in enumerate(tasks):
            where = f"tasks[{i}]." if len(tasks) > 1 else ""
            if t.type not in types:
                tt = await store.get_type(session, t.type)
                if tt is None or tt.deleted_at is not None:
                    raise TaskTypeNotFound(t.type, deleted=tt is not None)
                types[t.type] = tt
            self._validate_payload(types[t.type], t.payload, where)
            due = t.due_at or now
            if due.tzinfo is None or due.utcoffset() is None:
                raise InvalidInput(f"{where}due_at", f"needs a timezone: {due.isoformat()}")
            try:
                rec = recur.parse(t.recurrence)
                if rec is not None:
                    recur.check_fires(rec, due)
            except InvalidInput as exc:
                raise InvalidInput(where + exc.field, exc.problem) from None
            if t.dedup_key is not None and not t.dedup_key.strip():
                raise InvalidInput(f"{where}dedup_key", "must not be blank")
            fields = check_task_fields(t, where)
            task_id = t.id or uuid.uuid4()
            rows.append(
                {
                    **fields,
                    "id": task_id,
                    "type": t.type,
                    "payload": dict(t.payload),
                    "due_at": due,
                    "parent_id": t.parent_id,
                    "root_id": t.root_id or task_id,
                    "dedup_key": t.dedup_key,
                    "recurrence": recur.to_json(rec) if rec else None,
                    "created_by": t.created_by,
                    "occurrence": t.occurrence,
                }
            )
        given = [r["id"] for t, r in zip(tasks, rows, strict=True) if t.id is not None]
        if len(set(given)) < len(given):
            raise InvalidInput("id", "two tasks of one call have the same id")
        if given and (taken := await store.roots_of(session, given)):
            raise AlreadyExists(f"task {sorted(taken)[0]} exists; give a new id or none")
        return await self.write_rows(session, rows, now)

    async def write_rows(self, conn: Any, rows: Sequence[dict[str, Any]], now: datetime) -> list[Scheduled]:
        """Write tasks already checked (by `schedule_many`, or copies of a checked task
        such as the next occurrence of a recurrence): tasks, their dependencies, state
        and SCHEDULED events. A task waiting for dependencies starts with run_at null."""
        parents = {r["parent_id"] for r in rows if r["parent_id"] and r["root_id"] == r["id"]}
        if parents:
            roots = await store.roots_of(conn, list(parents))
            missing = parents - set(roots)
            if missing:
                raise InvalidInput("parent_id", f"no such task {sorted(missing)[0]}")
            for r in rows:
                if r["parent_id"] in parents and r["root_id"] == r["id"]:
                    r["root_id"] = roots[r["parent_id"]]
        named = await waiting.check_new(conn, rows)
        inserted = await store.insert_tasks(conn, rows)
        new_rows = [r for r in rows if r["id"] in inserted]
        existing: dict[str, uuid.UUID] = {}
        dup_keys = [r["dedup_key"] for r in rows if r["id"] not in inserted]
        if dup_keys:
            existing = await store.ids_by_dedup_key(conn, dup_keys)
        deps = waiting.NewDependencies()
        if any(r.get("depends_on") for r in rows):
            aliases = {r["id"]: existing[r["dedup_key"]] for r in rows if r["id"] not in inserted}
            await deps.judge(conn, rows, inserted, aliases, named)
        run_at = {r["id"]: None if deps.waits(r["id"]) else r["due_at"] for r in new_rows}
        states = [(r["id"], run_at[r["id"]], r.get("priority", 0)) for r in new_rows]
        await store.insert_states(conn, states, now)
        await store.insert_events(
            conn,
            [
                Transition(
                    task_id=r["id"],
                    state=State.SCHEDULED,
                    attempt=0,
                    source=r["created_by"] or "service",
                    detail={"due_at": r["due_at"].isoformat()}
                    | ({"waiting_for": len(deps.depends_on[r["id"]])} if deps.waits(r["id"]) else {}),
                )
                for r in new_rows
            ],
            now,
        )
        await deps.write(conn, now)
        if any(a is not None and a <= now + timedelta(seconds=WAKEUP_HORIZON_S) for a in run_at.values()):
            await store.notify_wakeup(conn)  # delivered at commit, and not at all on rollback
        return [
            Scheduled(r["id"], True) if r["id"] in inserted else Scheduled(existing[r["dedup_key"]], False)
            for r in rows
        ]

    def _validate_payload(self, t: TaskType, payload: Any, where: str = "") -> None:
        if not isinstance(payload, Mapping):
            raise InvalidInput(f"{where}payload", "must be a JSON object")
        import jsonschema  # a lookup in sys.modules once loaded

        key = (t.name, t.updated_at)
        validator = self._validators.get(key)
        if validator is None:
            cls = jsonschema.validators.validator_for(t.payload_schema, jsonschema.Draft202012Validator)
            validator = cls(t.payload_schema, format_checker=cls.FORMAT_CHECKER)
            self._validators[key] = validator
        error = jsonschema.exceptions.best_match(validator.iter_errors(dict(payload)))
        if error is not None:
            path = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
            raise InvalidInput(f"{where}payload{path}", f"{error.message} (task type {t.name!r})")
        try:
            size = len(json.dumps(dict(payload), separators=(",", ":")).encode())
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"{where}payload", f"not JSON-serialisable: {exc}") from None
        if size > MAX_PAYLOAD_BYTES:
            raise InvalidInput(
                f"{where}payload", f"{size} bytes of JSON; at most {MAX_PAYLOAD_BYTES} bytes are allowed"
            )

    # -- follow-on tasks and schedule syncs (from runners' reports) ------------------

    async def schedule_follow_ons(
        self,
        conn: Any,
        parent: Task | Mapping[str, Any],
        follow_ons: Sequence[Any],
        now: datetime | None = None,
        *,
        types: dict[str, TaskType] | None = None,
    ) -> list[Scheduled]:
        """A handler's follow-on tasks, in the caller's transaction (the manager's, that
        applies the report carrying them), idempotent: the dedup key is scoped to the
        parent, so a repeated report writes nothing new."""
        parent_id, root_id = _ids_of(parent)
        now = now or self._clock()
        news = [
            NewTask(
                type=f.type,
                payload=f.payload,
                due_at=(f.due_at or now) + timedelta(seconds=f.delay_s),
                dedup_key=f"{parent_id}/{f.dedup_key}",
                parent_id=parent_id,
                root_id=root_id,
                created_by="runner",
            )
            for f in follow_ons
        ]
        return await self.schedule_many(conn, news, types=types)

    async def sync_children(
        self,
        conn: Any,
        parent: Task | Mapping[str, Any],
        scope: str,
        follow_ons: Sequence[Any],
        *,
        types: dict[str, TaskType] | None = None,
    ) -> SyncResult:
        """Make the tasks under `scope` exactly `follow_ons` (see taskmgr.handlers.ChildSync),
        in the caller's transaction (`types`: as for schedule_many)."""
        parent_id, root_id = _ids_of(parent)
        now = self._clock()
        await store.lock_scope(conn, scope)
        # The latest generation of each game's task: a game the schedule cancelled that
        # comes back gets a new task under "<key>#<n>" (a cancelled task stays cancelled).
        existing: dict[str, Any] = {}
        generation: dict[str, int] = {}
        for r in await store.sync_scope(conn, scope):
            base, _, n = r["dedup_key"].partition("#")
            g = int(n) if n.isdigit() else 1
            if g >= generation.get(base, 0):
                existing[base], generation[base] = r, g
        wanted: dict[str, Any] = {f"{scope}/{f.dedup_key}": f for f in follow_ons}
        new, moved, cancels, unchanged = [], 0, [], 0
        for key, f in wanted.items():
            due = (f.due_at or now) + timedelta(seconds=f.delay_s)
            row = existing.get(key)
            if row is None:
                new.append(NewTask(f.type, f.payload, due, key, parent_id, root_id, None, "schedule"))
            elif row["state"] == State.CANCELLED and row["last_source"] == "schedule":
                # Dropped from an earlier listing (postponed, or a short listing) and
                # listed again: revived as a new task; an operator's cancel stands.
                revived = f"{key}#{generation[key] + 1}"
                new.append(NewTask(f.type, f.payload, due, revived, parent_id, root_id, None, "schedule"))
            elif row["state"] == State.SCHEDULED and row["due_at"] != due:
                await waiting.move_due(conn, row["id"], due, now)
                cur = CurrentState(row["id"], State.SCHEDULED, 0, 0, None, None, f.type, root_id)
                await store.insert_events(conn, [waiting.moved(cur, row["due_at"], due, "schedule")], now)
                moved += 1
            else:
                unchanged += 1
        # Only games still waiting are cancelled: one under way is never stopped by a
        # listing (it ends by its own poll), and a running one is never cancelled here.
        for key, row in existing.items():
            if key not in wanted and row["state"] == State.SCHEDULED:
                cancels.append(
                    Transition(
                        row["id"],
                        State.CANCELLED,
                        0,
                        "schedule",
                        detail={"reason": "no longer in the schedule (postponed or dropped)"},
                    )
                )
        await self.schedule_many(conn, new, types=types)
        await store.apply_transitions(conn, cancels, now, strict=False)
        return SyncResult(len(new), moved, len(cancels), unchanged)

    # -- state changes -----------------------------------------------------------------

    async def record(
        self, session: Any, transitions: Sequence[Transition], *, strict: bool = True
    ) -> list[Transition]:
        """Append state changes through the state machine (in the caller's transaction)."""
        return await store.apply_transitions(session, transitions, self._clock(), strict=strict)

    # -- reading -------------------------------------------------------------------------

    async def get_task(self, task_id: uuid.UUID) -> Task:
        async with self._engine.connect() as conn:
            t = await store.get_task(conn, task_id)
        if t is None:
            raise TaskNotFound(task_id)
        return t

    async def list_tasks(self, **filters: Any) -> list[Task]:
        async with self._engine.connect() as conn:
            return await store.list_tasks(conn, **filters)

    async def history(self, task_id: uuid.UUID) -> list[TaskEvent]:
        await self.get_task(task_id)
        async with self._engine.connect() as conn:
            return await store.history(conn, task_id)

    async def audit(self, root_id: uuid.UUID) -> tuple[list[Task], list[TaskEvent]]:
        """The whole tree under a root task and every state change in it."""
        await self.get_task(root_id)
        async with self._engine.connect() as conn:
            tasks = await store.list_tasks(conn, root_id=root_id, limit=100_000)
            return tasks, await store.tree_events(conn, root_id)

    async def counts_by_state(self, *, type: str | None = None) -> dict[State, int]:
        """Tasks by state: of all types from the counts kept by triggers (a few rows);
        of one type, counted."""
        async with self._engine.connect() as conn:
            if type is None:
                return await upkeep.state_counts(conn)
            return await upkeep.counts_by_state(conn, type=type)

    async def counts_per_bucket(
        self, bucket: str, since: datetime, until: datetime
    ) -> list[tuple[datetime, State, int]]:
        m = re.fullmatch(r"(\d+)\s*(second|minute|hour|day|week)s?", bucket.strip())
        if not m or int(m.group(1)) == 0:
            raise InvalidInput("bucket", f"{bucket!r} is not like '1 minute' or '5 minutes'")
        width = timedelta(**{m.group(2) + "s": int(m.group(1))})
        async with self._engine.connect() as conn:
            return await upkeep.counts_per_bucket(conn, width, since, until)


def _ids_of(parent: Task | Mapping[str, Any]) -> tuple[uuid.UUID, uuid.UUID]:
    if isinstance(parent, Task):
        return parent.id, parent.root_id
    return uuid.UUID(str(parent["task_id"])), uuid.UUID(str(parent["root_task_id"]))


def _type_values(values: Mapping[str, Any] | TaskType) -> dict[str, Any]:
    if isinstance(values, TaskType):
        return values.model_dump(include=set(TYPE_FIELDS))
    return dict(values)
