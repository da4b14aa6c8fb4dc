-- Task lifecycle events (`task.<type>.<state>` on the events exchange), through an outbox.
-- Every applied state change (a task_events row with applied = true) also writes a row
-- here, by a trigger, in the same transaction: a rollback leaves no event, a commit
-- leaves one to publish. The leading manager's relay takes rows (for update skip
-- locked), publishes them with confirms, and deletes them in the same transaction after
-- the confirms: a crash before the commit publishes them again, never loses one. A
-- repeat carries the same event id, uuid5 of the task and the history row's seq.

create table lifecycle_outbox (
    id          bigserial primary key,
    seq         bigint not null,
    time        timestamptz not null,
    task_id     uuid not null,
    state       text not null,
    attempt     integer not null,
    runner_id   text,
    source      text not null,
    detail      jsonb not null default '{}'::jsonb
);
comment on table lifecycle_outbox is 'Task state changes not yet published as lifecycle events; the manager''s relay deletes them once confirmed by the broker.';
comment on column lifecycle_outbox.seq is 'The task_events row''s seq: with task_id, the lifecycle event''s stable id.';

create function taskmgr_lifecycle_outbox() returns trigger language plpgsql as $$
begin
    insert into lifecycle_outbox (seq, time, task_id, state, attempt, runner_id, source, detail)
    values (new.seq, new.time, new.task_id, new.state, new.attempt, new.runner_id, new.source, new.detail);
    return null;
end $$;
create trigger task_events_lifecycle after insert on task_events
    for each row when (new.applied) execute function taskmgr_lifecycle_outbox();

grant select, insert, delete on lifecycle_outbox to taskmgr_manager;
grant usage on sequence lifecycle_outbox_id_seq to taskmgr_manager;
grant select on lifecycle_outbox to taskmgr_reader;
