-- Named queries of waiting tasks (SCHEDULED or RETRYING), loaded by taskmgr/waiting.py:
-- "-- name --" then the SQL. What may change while a task waits (its due time, its
-- payload) and what it waits for (its dependencies, sql/0016).

-- move_due --
update tasks set due_at = :due_at where id = :id;

-- move_run_at --
-- A task still waiting for its dependencies (run_at null) keeps waiting: its release
-- makes it due at the new due_at.
update task_state set run_at = :due_at, changed_at = :now
where task_id = :id and state = 'SCHEDULED' and run_at is not null;

-- set_retry_at --
-- A RETRYING task's next attempt, moved (TaskService.reschedule).
update task_state set run_at = :run_at, changed_at = :now where task_id = :id and state = 'RETRYING';

-- set_payload --
update tasks set payload = cast(:payload as jsonb) where id = :id;

-- lock_dependencies --
-- The states of the tasks named as dependencies (those that exist), share-locked until
-- the transaction ends: none can end between this read and the commit of the tasks
-- that wait for it (its end, waiting for the lock, then sees them).
select s.task_id, s.state from task_state s
where s.task_id = any(cast(:ids as uuid[]))
order by s.task_id
for share of s;

-- insert_dependencies --
insert into task_dependencies (task_id, depends_on)
select d.task_id, d.depends_on
from unnest(cast(:task_ids as uuid[]), cast(:depends_ons as uuid[])) as d(task_id, depends_on)
on conflict do nothing;

-- lock_dependents --
-- The tasks still waiting (SCHEDULED, run_at null) for any of these, which just ended,
-- locked in id order. Locked before their dependencies' states are read (next query):
-- two dependencies ending at once in two transactions take turns on the waiting task,
-- so the second sees the first's end and the last one to end releases it. Cost: the
-- entries of task_dependencies_parent_idx of the tasks that ended.
select s.task_id, s.state, s.attempt, s.failures, s.runner_id, s.run_at, t.type, t.root_id,
    t.due_at, t.on_dependency_failure
from task_state s join tasks t on t.id = s.task_id
where s.task_id in (select d.task_id from task_dependencies d where d.depends_on = any(cast(:ids as uuid[])))
  and s.state = 'SCHEDULED' and s.run_at is null
order by s.task_id
for update of s;

-- dependency_states --
select d.task_id, d.depends_on, s.state
from task_dependencies d join task_state s on s.task_id = d.depends_on
where d.task_id = any(cast(:ids as uuid[]));

-- release --
-- Waiting tasks whose dependencies ended: due at run_at (their due time, or now if it
-- passed while they waited).
update task_state s set run_at = r.run_at
from unnest(cast(:ids as uuid[]), cast(:run_ats as timestamptz[])) as r(task_id, run_at)
where s.task_id = r.task_id and s.state = 'SCHEDULED' and s.run_at is null;
