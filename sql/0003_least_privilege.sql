-- Least privilege. Roles are cluster-wide: created here when missing (migrations run as
-- the database owner with CREATEROLE, or a superuser). They can log in; operators set
-- passwords (ALTER ROLE ... PASSWORD) where authentication needs them.
--   taskmgr_manager: dispatch, progress, recovery, retention (through a function).
--   taskmgr_runner:  read task types, write follow-on tasks and their first events.
--   taskmgr_reader:  read everything (dashboards, analysts).
-- Nobody updates or deletes task_events rows: a trigger forbids it even to the owner;
-- retention drops whole chunks through taskmgr_drop_old_events (SECURITY DEFINER).

do $$
declare r text;
begin
    foreach r in array array['taskmgr_manager', 'taskmgr_runner', 'taskmgr_reader'] loop
        if not exists (select 1 from pg_roles where rolname = r) then
            execute format('create role %I login', r);
        end if;
    end loop;
end $$;

create function taskmgr_events_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'task_events is append-only: % is not allowed (retention drops whole chunks)', tg_op
        using errcode = 'insufficient_privilege';
end $$;
create trigger task_events_append_only before update or delete on task_events
    for each row execute function taskmgr_events_append_only();

create function taskmgr_drop_old_events(older_than timestamptz) returns integer
    language sql security definer set search_path = public, pg_temp as $$
    select count(*)::integer from drop_chunks('task_events', older_than => older_than)
$$;
revoke all on function taskmgr_drop_old_events(timestamptz) from public;

grant usage on schema public to taskmgr_manager, taskmgr_runner, taskmgr_reader;
grant select on all tables in schema public to taskmgr_reader;

grant select on task_types, schema_migrations to taskmgr_manager, taskmgr_runner;
grant select, insert, update on tasks, task_state, task_services, runners to taskmgr_manager;
grant select, insert on task_events to taskmgr_manager;
grant execute on function taskmgr_drop_old_events(timestamptz) to taskmgr_manager;

grant select, insert on tasks to taskmgr_runner;
grant update (due_at) on tasks to taskmgr_runner;  -- a schedule sync moves a game
grant select, insert, update on task_state to taskmgr_runner;
grant insert on task_events to taskmgr_runner;

grant usage on sequence task_events_seq_seq to taskmgr_manager, taskmgr_runner;
