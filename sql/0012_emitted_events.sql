-- Every event the runners emit, stored once: the history downstream services ask "what
-- happened in this game" of, afterwards. Written by the recorder (`taskmgr recorder`),
-- which consumes its own durable queue bound to the events exchange, in batches.
--
-- Dedup. An event's id is stable (uuid5 of task, event and observation key), but its
-- observed_at is the time of the poll that saw it: a repeat (a second runner, a new
-- attempt, a publish tried again) carries another time. A TimescaleDB unique index must
-- include the partitioning column, so a unique (event_id, time) would let each repeat in.
-- The ids live instead in a plain table, emitted_event_ids (event_id primary key), and
-- the recorder's one statement inserts a batch's ids there first (on conflict do
-- nothing) and only the rows whose id was new into the hypertable. The hypertable's time
-- is the observed_at of the first copy recorded.

create table emitted_events (
    time          timestamptz not null,
    event_id      uuid not null,
    kind          text not null check (kind <> ''),
    task_type     text not null,
    task_id       uuid not null,
    root_task_id  uuid not null,
    runner_id     text not null,
    attempt       integer not null check (attempt >= 0),
    version       integer not null default 1 check (version >= 1),
    data          jsonb not null default '{}'::jsonb,
    recorded_at   timestamptz not null default now()
);
comment on table emitted_events is 'Every event published on the events exchange, once per event id (emitted_event_ids holds the ids). Append-only; retention drops whole chunks.';
comment on column emitted_events.time is 'observed_at of the first copy recorded (a repeat carries its own poll''s time and is not stored).';
comment on column emitted_events.kind is 'The event name, the routing key after the task type: score.changed, game.final, ...';
comment on column emitted_events.runner_id is 'The runner whose copy was recorded first.';
comment on column emitted_events.version is 'The version of the kind''s JSON Schema its data follows.';
-- One-day chunks, as task_events: retention drops whole days.
select create_hypertable('emitted_events', by_range('time', interval '1 day'));
create index emitted_events_task_idx on emitted_events (task_id, time);
create index emitted_events_root_idx on emitted_events (root_task_id, time);

create table emitted_event_ids (
    event_id  uuid primary key,
    time      timestamptz not null
);
comment on table emitted_event_ids is 'The ids of the events in emitted_events (dedup: a hypertable''s unique index would have to include its time, which repeats do not share). time is the stored row''s, for retention.';
create index emitted_event_ids_time_idx on emitted_event_ids (time);

-- Append-only for everyone, as task_events (retention drops chunks: no row trigger fires).
create trigger emitted_events_append_only before update or delete on emitted_events
    for each row execute function taskmgr_events_append_only();

-- Retention, as taskmgr_drop_old_events: drop_chunks needs the owner, and the owner's
-- floor (taskmgr_policy.min_retention_days) bounds what the manager's role may drop.
-- The ids of the dropped rows go too: those older than the oldest chunk left (a chunk
-- that straddles the cutoff keeps its rows, so it keeps their ids).
create function taskmgr_drop_old_emitted_events(older_than timestamptz) returns integer
    language plpgsql security definer set search_path = public, pg_temp as $$
declare
    cutoff  timestamptz := least(older_than,
        now() - make_interval(days => (select min_retention_days from taskmgr_policy)));
    dropped integer;
    oldest  timestamptz;
begin
    select count(*)::integer into dropped from drop_chunks('emitted_events', older_than => cutoff);
    select min(range_start) into oldest from timescaledb_information.chunks
        where hypertable_schema = 'public' and hypertable_name = 'emitted_events';
    delete from emitted_event_ids where time < least(cutoff, coalesce(oldest, cutoff));
    return dropped;
end $$;
revoke all on function taskmgr_drop_old_emitted_events(timestamptz) from public;

-- The recorder runs as the manager's role: it may add events, never change them.
grant select, insert on emitted_events, emitted_event_ids to taskmgr_manager;
grant execute on function taskmgr_drop_old_emitted_events(timestamptz) to taskmgr_manager;
grant select on emitted_events, emitted_event_ids to taskmgr_reader;
