-- Only the manager changes a task, and only along the state machine.
--
-- 1. Runners hold no database credentials any more: their follow-on tasks and schedule
--    syncs travel in their reports and the manager writes them. The taskmgr_runner role
--    keeps nothing in this database (roles are cluster-wide, so it is not dropped here;
--    an operator may `drop role taskmgr_runner` once no database grants it anything).
-- 2. task_state changes only as the state machine allows, whoever writes: a trigger
--    refuses a change the machine cannot reach (see below). `taskmgr rebuild-state`
--    (run by the owner, never by taskmgr_manager) sets taskmgr.rebuild for its
--    transaction, since a rebuilt row may jump to what the history says.
-- 3. Retention drops only chunks older than a floor the owner sets
--    (taskmgr_policy.min_retention_days): the function clamps its argument, so the
--    manager's role cannot erase recent history whatever it asks.

revoke all on all tables in schema public from taskmgr_runner;
revoke all on all sequences in schema public from taskmgr_runner;
revoke usage on schema public from taskmgr_runner;

-- One statement may fold several legal steps of a task into its row (the intake applies
-- a batch of reports at once, each step checked by store.apply_transitions), so the
-- trigger checks the net change against what the state machine can reach
-- (taskmgr.models.TRANSITIONS; a test tries every pair of states): a finished or
-- cancelled task never changes again and no task goes back to SCHEDULED. The WHEN
-- clause skips the updates that keep the state (dispatch moves thousands per statement).
create function taskmgr_state_machine() returns trigger language plpgsql as $$
begin
    if (old.state in ('FINISHED', 'CANCELLED') or new.state = 'SCHEDULED')
       and not (coalesce(current_setting('taskmgr.rebuild', true), '') = 'on'
                and session_user <> 'taskmgr_manager') then
        raise exception 'task %: % -> % is not reachable in the state machine',
            old.task_id, old.state, new.state using errcode = 'check_violation';
    end if;
    return new;
end $$;
create trigger task_state_machine before update on task_state
    for each row when (old.state is distinct from new.state)
    execute function taskmgr_state_machine();

-- A new task starts SCHEDULED: nobody inserts a task in another state.
create function taskmgr_state_insert() returns trigger language plpgsql as $$
begin
    if new.state <> 'SCHEDULED' then
        raise exception 'a task starts SCHEDULED, not %', new.state using errcode = 'check_violation';
    end if;
    return new;
end $$;
create trigger task_state_starts_scheduled before insert on task_state
    for each row execute function taskmgr_state_insert();

create table taskmgr_policy (
    id                  boolean primary key default true check (id),
    min_retention_days  integer not null default 30 check (min_retention_days >= 1)
);
comment on table taskmgr_policy is 'Owner-set limits the service roles cannot change. min_retention_days: retention never drops history newer than this.';
insert into taskmgr_policy default values;

create or replace function taskmgr_drop_old_events(older_than timestamptz) returns integer
    language sql security definer set search_path = public, pg_temp as $$
    select count(*)::integer from drop_chunks('task_events', older_than => least(
        older_than,
        now() - make_interval(days => (select min_retention_days from taskmgr_policy))))
$$;
revoke all on function taskmgr_drop_old_events(timestamptz) from public;
grant execute on function taskmgr_drop_old_events(timestamptz) to taskmgr_manager;

grant select on taskmgr_policy to taskmgr_manager, taskmgr_reader;
