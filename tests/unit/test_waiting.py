"""The rules of waiting tasks without services: when a task waiting for dependencies
may run, the checks of a new task's dependencies, name and priority, and the CLI's
KEY=VALUE parameters."""

from __future__ import annotations

import uuid

import click
import pytest

from taskmgr.cli.tasks import parse_parameters, payload_of
from taskmgr.errors import InvalidInput
from taskmgr.models import DependencyPolicy, Readiness, State, readiness
from taskmgr.service import NewTask, check_task_fields
from taskmgr.waiting import MAX_DEPENDENCIES, _check_acyclic, check_depends_on

A, B, C = (uuid.UUID(int=i) for i in (1, 2, 3))
FAIL, RUN = DependencyPolicy.FAIL, DependencyPolicy.RUN


@pytest.mark.parametrize(
    ("states", "policy", "expected"),
    [
        ({}, FAIL, (Readiness.READY, None)),
        ({A: State.FINISHED, B: State.FINISHED}, FAIL, (Readiness.READY, None)),
        ({A: State.FINISHED, B: State.RUNNING}, FAIL, (Readiness.WAITING, None)),
        ({A: State.FINISHED, B: State.RETRYING}, RUN, (Readiness.WAITING, None)),
        # A failure fails the task at once, without waiting for the others.
        ({A: State.SCHEDULED, B: State.FAILED}, FAIL, (Readiness.FAILED, B)),
        ({A: State.CANCELLED, B: State.FINISHED}, FAIL, (Readiness.FAILED, A)),
        ({C: State.FAILED, B: State.CANCELLED}, FAIL, (Readiness.FAILED, B)),  # the first by id
        # run: an ended dependency is ended, however it ended; the others still count.
        ({A: State.FAILED, B: State.RUNNING}, RUN, (Readiness.WAITING, None)),
        ({A: State.FAILED, B: State.CANCELLED, C: State.FINISHED}, RUN, (Readiness.READY, None)),
    ],
)
def test_readiness(states: dict[uuid.UUID, State], policy: DependencyPolicy, expected: tuple) -> None:  # type: ignore[type-arg]
    assert readiness(states, policy) == expected


def _rows(edges: dict[uuid.UUID, list[uuid.UUID]]) -> list[dict[str, object]]:
    return [{"id": t, "depends_on": deps} for t, deps in edges.items()]


def test_a_cycle_among_one_calls_tasks_is_refused_and_names_it() -> None:
    d = uuid.UUID(int=4)
    _check_acyclic(_rows({A: [], B: [A], C: [A], d: [B, C]}))  # a diamond
    with pytest.raises(InvalidInput, match=f"a cycle: {B} -> {C} -> {B}") as info:
        _check_acyclic(_rows({A: [], B: [A, C], C: [B]}))
    assert info.value.field == "depends_on"
    with pytest.raises(InvalidInput, match="cannot wait for itself"):
        _check_acyclic(_rows({A: [A]}))
    # Dependencies outside the call are not its edges: no cycle can go through them.
    _check_acyclic(_rows({A: [uuid.uuid4()], B: [A]}))


def test_a_long_chain_is_checked_without_recursion() -> None:
    ids = [uuid.uuid4() for _ in range(20_000)]
    chain = {t: [ids[i - 1]] if i else [] for i, t in enumerate(ids)}
    _check_acyclic(_rows(chain))
    chain[ids[0]] = [ids[-1]]
    with pytest.raises(InvalidInput, match="a cycle"):
        _check_acyclic(_rows(chain))


def test_depends_on_is_a_list_of_task_ids() -> None:
    assert check_depends_on([str(A), A, B]) == (A, B)  # strings or UUIDs, each once
    assert check_depends_on(None) == ()
    with pytest.raises(InvalidInput, match="depends_on: must be a list"):
        check_depends_on(str(A))
    with pytest.raises(InvalidInput, match=r"tasks\[2\].depends_on: 'x' is not a task id"):
        check_depends_on(["x"], "tasks[2].")
    with pytest.raises(InvalidInput, match=f"at most {MAX_DEPENDENCIES}"):
        check_depends_on([uuid.uuid4() for _ in range(MAX_DEPENDENCIES + 1)])


@pytest.mark.parametrize(
    ("changes", "field", "problem"),
    [
        ({"priority": 40_000}, "priority", "from -32768 to 32767"),
        ({"priority": True}, "priority", "integer"),
        ({"priority": 1.5}, "priority", "integer"),
        ({"name": "  "}, "name", "non-blank"),
        ({"name": "n" * 201}, "name", "at most 200"),
        ({"description": "d" * 4001}, "description", "at most 4000"),
        ({"on_dependency_failure": "ignore"}, "on_dependency_failure", "one of fail, run"),
        ({"depends_on": [A], "recurrence": {"every_s": 60}}, "depends_on", "recurring"),
    ],
)
def test_a_new_tasks_fields_are_checked(changes: dict[str, object], field: str, problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem) as info:
        check_task_fields(NewTask("box", **changes))  # type: ignore[arg-type]
    assert info.value.field == field


def test_a_new_tasks_fields_as_written() -> None:
    fields = check_task_fields(
        NewTask("box", name="A game", priority=-5, depends_on=[A, A], on_dependency_failure="run")
    )
    assert fields == {
        "name": "A game",
        "description": None,
        "priority": -5,
        "depends_on": (A,),
        "on_dependency_failure": DependencyPolicy.RUN,
    }


def test_parameters_are_json_when_they_parse_else_strings() -> None:
    assert parse_parameters(
        ["n=5", "ok=true", "s=Weekly Update", 'q="5"', "l=[1,2]", "e=", "eq=a=b", " k =1"]
    ) == {"n": 5, "ok": True, "s": "Weekly Update", "q": "5", "l": [1, 2], "e": "", "eq": "a=b", "k": 1}
    for bad in ("novalue", "=5"):
        with pytest.raises(click.ClickException, match="is not KEY=VALUE"):
            parse_parameters([bad])


def test_parameters_are_set_over_the_payload() -> None:
    assert payload_of('{"a": 1, "b": 2}', ["b=3", "c=x"]) == {"a": 1, "b": 3, "c": "x"}
    assert payload_of(None, ["a=1"]) == {"a": 1}
    assert payload_of('{"a": 1}', []) == {"a": 1}
    assert payload_of(None, []) is None
    with pytest.raises(click.ClickException, match="must be a JSON object"):
        payload_of("[1]", ["a=1"])


def test_a_deadlock_is_transient_not_the_datas_fault() -> None:
    """Two dependencies ending at once may, in a rare graph, lock two waiting tasks in
    opposite orders: PostgreSQL aborts one transaction, which goes back whole (an intake
    batch is requeued, not split down to a dead-lettered report)."""
    import asyncpg

    from taskmgr.db import is_transient
    from taskmgr.store import StoreError

    def chained(cause: BaseException) -> StoreError:
        try:
            try:
                raise cause
            except Exception as exc:
                raise StoreError("lock_dependents: failed") from exc
        except StoreError as outer:
            return outer

    assert is_transient(chained(asyncpg.exceptions.DeadlockDetectedError("deadlock detected")))
    assert not is_transient(chained(asyncpg.exceptions.CheckViolationError("check violation")))
