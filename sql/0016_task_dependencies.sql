-- Dependencies (Requires/After): a task may wait for other tasks. It becomes due only
-- when every one of them has FINISHED; a dependency that ends FAILED or CANCELLED fails
-- it (on_dependency_failure = 'fail', the default) or counts as ended
-- (on_dependency_failure = 'run': it runs once every dependency has ended, whatever the
-- outcome). The release is written in the transaction that ends the last dependency
-- (taskmgr/waiting.py, called where every state change is written): no job polls.
--
-- Dependencies are named when a task is created and never change afterwards, and only
-- tasks that exist (or are created in the same call) can be named, so the graph is
-- acyclic by construction; a batch naming its own tasks in a cycle is refused.
--
-- A task waiting for its dependencies is SCHEDULED with run_at null: it is in no range
-- a claim reads (run_at <= now) and min(run_at) ignores it.

alter table tasks add column on_dependency_failure text not null default 'fail'
    check (on_dependency_failure in ('fail', 'run'));
comment on column tasks.on_dependency_failure is 'A dependency that ends FAILED or CANCELLED: fail this task (fail) or run it once every dependency has ended (run).';

create table task_dependencies (
    task_id     uuid not null references tasks (id) on delete cascade,
    depends_on  uuid not null references tasks (id) on delete cascade,
    primary key (task_id, depends_on),
    check (task_id <> depends_on)
);
comment on table task_dependencies is 'task_id waits for depends_on to end (see tasks.on_dependency_failure). Written with the task, never changed.';
-- A task that ends looks up the tasks waiting for it.
create index task_dependencies_parent_idx on task_dependencies (depends_on);

alter table task_state drop constraint task_state_check;
alter table task_state add constraint task_state_run_at_check check (
    case state
        when 'RETRYING' then run_at is not null
        when 'SCHEDULED' then true  -- null while it waits for its dependencies
        else run_at is null
    end);
comment on column task_state.run_at is 'SCHEDULED/RETRYING: when discovery should start it. Null for a SCHEDULED task still waiting for its dependencies.';

grant select, insert on task_dependencies to taskmgr_manager;
grant select on task_dependencies to taskmgr_reader;
