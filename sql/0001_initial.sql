-- taskmgr schema, version 1.
-- Two stores: relational tables that rarely change (task_types, tasks) and the
-- append-only TimescaleDB hypertable task_events, the history of every task.
-- task_state is a projection of task_events (the latest applied event per task),
-- written in the same transaction as the event, for fast discovery.

create extension if not exists timescaledb;

create table task_types (
    name            text primary key
                    check (name ~ '^[a-z][a-z0-9_.-]{0,62}$'),
    handler         text not null check (handler <> ''),
    url_template    text not null default '',
    poll_interval_s double precision not null default 5 check (poll_interval_s > 0),
    payload_schema  jsonb not null default '{}'::jsonb,
    max_attempts    integer not null default 3 check (max_attempts >= 1),
    backoff_base_s  double precision not null default 2 check (backoff_base_s >= 0),
    backoff_max_s   double precision not null default 300 check (backoff_max_s >= backoff_base_s),
    request_timeout_s double precision not null default 10 check (request_timeout_s > 0),
    start_timeout_s double precision not null default 30 check (start_timeout_s > 0),
    max_consecutive_failures integer not null default 5 check (max_consecutive_failures >= 1),
    pool            text not null default 'default' check (pool ~ '^[A-Za-z0-9_.-]{1,64}$'),
    required_services text[] not null default '{}',
    misfire_policy  text not null default 'coalesce'
                    check (misfire_policy in ('coalesce', 'catch_up', 'skip')),
    misfire_grace_s double precision not null default 60 check (misfire_grace_s >= 0),
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    deleted_at      timestamptz
);
comment on table task_types is 'What each kind of task does; soft-deleted with deleted_at.';
comment on column task_types.handler is 'Name of the handler in task_types/ (or an entry point).';
comment on column task_types.url_template is 'str.format template over the payload plus {base}, the provider base URL.';
comment on column task_types.max_attempts is 'Failed attempts allowed before FAILED for good.';
comment on column task_types.max_consecutive_failures is 'Failed polls in a row before the runner reports the attempt FAILED.';
comment on column task_types.start_timeout_s is 'A STARTED task no runner took within this is dispatched again.';
comment on column task_types.required_services is 'Outside services whose reports decide the overall state.';
comment on column task_types.misfire_policy is 'Recurring tasks late past misfire_grace_s: coalesce (run once, skip missed), catch_up (run every slot), skip (cancel the late one).';

create table tasks (
    id          uuid primary key,
    type        text not null references task_types (name),
    payload     jsonb not null default '{}'::jsonb,
    due_at      timestamptz not null,
    parent_id   uuid references tasks (id),
    root_id     uuid not null,
    dedup_key   text unique,
    recurrence  jsonb,
    occurrence  integer not null default 1 check (occurrence >= 1),
    created_at  timestamptz not null default now(),
    created_by  text not null default ''
);
comment on column tasks.root_id is 'The root of the tree of follow-on tasks (itself for a root).';
comment on column tasks.dedup_key is 'Makes scheduling idempotent: a second schedule with the same key returns the first task.';
comment on column tasks.recurrence is '{"every_s": n} or {"cron": expr, "timezone": tz}, plus ends_after / ends_at; each occurrence is its own task.';
create index tasks_root_idx on tasks (root_id);
create index tasks_parent_idx on tasks (parent_id) where parent_id is not null;
create index tasks_dedup_prefix_idx on tasks (dedup_key text_pattern_ops) where dedup_key is not null;

create table task_events (
    time        timestamptz not null default now(),
    task_id     uuid not null,
    state       text not null check (state in
                ('SCHEDULED', 'STARTED', 'RUNNING', 'RETRYING', 'FINISHED', 'FAILED', 'CANCELLED')),
    attempt     integer not null check (attempt >= 0),
    runner_id   text,
    source      text not null,
    applied     boolean not null default true,
    detail      jsonb not null default '{}'::jsonb,
    seq         bigserial
);
comment on column task_events.seq is 'Insertion order: a task''s changes are written under its task_state row lock, so seq orders its history exactly.';
comment on table task_events is 'Append-only history: one row per state change (applied) or per report kept for the record (applied = false: poll errors, stale attempts, service reports). Never updated.';
-- One-day chunks: retention drops whole days, and a day of a busy season (tens of
-- millions of rows) keeps the open chunk and its indexes in memory.
select create_hypertable('task_events', by_range('time', interval '1 day'));
create index task_events_task_idx on task_events (task_id, time desc);

create table task_state (
    task_id     uuid primary key references tasks (id),
    state       text not null check (state in
                ('SCHEDULED', 'STARTED', 'RUNNING', 'RETRYING', 'FINISHED', 'FAILED', 'CANCELLED')),
    attempt     integer not null default 0,
    failures    integer not null default 0,
    run_at      timestamptz,
    runner_id   text,
    sent_at     timestamptz,
    changed_at  timestamptz not null default now(),
    check ((state in ('SCHEDULED', 'RETRYING')) = (run_at is not null))
);
comment on table task_state is 'Current state per task: a projection of task_events, rebuilt by `taskmgr rebuild-state`.';
comment on column task_state.run_at is 'SCHEDULED/RETRYING: when discovery should start it.';
comment on column task_state.sent_at is 'STARTED: when the broker confirmed its start order; null while it waits in the outbox.';
-- Discovery reads only what is due: these partial indexes hold only waiting tasks.
create index task_state_due_idx on task_state (run_at) where state in ('SCHEDULED', 'RETRYING');
create index task_state_outbox_idx on task_state (changed_at) where state = 'STARTED' and sent_at is null;
create index task_state_active_idx on task_state (runner_id) where state in ('STARTED', 'RUNNING');

create table task_services (
    task_id     uuid not null references tasks (id),
    service     text not null,
    attempt     integer not null,
    state       text not null check (state in ('RUNNING', 'FINISHED', 'FAILED')),
    detail      jsonb not null default '{}'::jsonb,
    updated_at  timestamptz not null default now(),
    primary key (task_id, service)
);
comment on table task_services is 'Latest per-service state reported by outside services for a task.';

create table runners (
    id          text primary key,
    pool        text not null,
    host        text not null default '',
    pid         integer,
    started_at  timestamptz not null default now(),
    last_seen   timestamptz not null default now(),
    stopped_at  timestamptz,
    tasks       integer not null default 0,
    dead        boolean not null default false
);
comment on table runners is 'TaskRunner processes as their heartbeats show them.';
