-- The HTTP API (`taskmgr api`): its tokens and its database role.
--
-- api_tokens: one row per API token. The secret is shown once, when the token is made
-- (`taskmgr tokens create`); only its SHA-256 is kept, so a copy of this table lets
-- nobody in. Scopes are ordered: read < write < admin (a token may do what its scope
-- and every lower scope allow). A revoked token stays for the record.
--
-- taskmgr_api: the role of the API process. It reads what the API shows, writes what an
-- operator may do through TaskService (create tasks, cancel, retry; task types with the
-- admin scope), reads the token hashes and marks a token used. It cannot change the
-- history, touch the lease, the runners or the policy, or make or revoke tokens (the
-- owner does, with the CLI).

do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'taskmgr_api') then
        create role taskmgr_api login;
    end if;
end $$;

create table api_tokens (
    id             uuid primary key,
    name           text not null unique check (name ~ '^[A-Za-z0-9_.@-]{1,100}$'),
    scope          text not null check (scope in ('read', 'write', 'admin')),
    secret_sha256  bytea not null unique check (length(secret_sha256) = 32),
    created_at     timestamptz not null default now(),
    created_by     text not null default '',
    revoked_at     timestamptz,
    last_used_at   timestamptz
);
comment on table api_tokens is 'API tokens (taskmgr tokens create): the SHA-256 of each secret, never the secret. scope: read < write < admin.';
comment on column api_tokens.last_used_at is 'Set by the API at most once a minute per token.';

grant usage on schema public to taskmgr_api;
-- Reading: what the routes and the console show.
grant select on task_types, tasks, task_state, task_events, task_services, runners,
    taskmgr_leader, schema_migrations, emitted_events to taskmgr_api;
-- Writing through TaskService: new tasks (their state row and SCHEDULED event), cancel
-- and retry (a state change and its event; the lifecycle trigger's outbox row).
grant insert on tasks, task_state, task_events, lifecycle_outbox to taskmgr_api;
grant update on task_state to taskmgr_api;
grant usage on sequence task_events_seq_seq, lifecycle_outbox_id_seq to taskmgr_api;
-- What the same TaskService calls write through the triggers and features before this
-- migration: the counts by state (sql/0017, every state row written), a new task's
-- dependencies and their release (sql/0016, locks included), a waiting task's new due
-- time or payload (reschedule, payload update).
grant select, insert on task_state_counts, task_dependencies to taskmgr_api;
grant usage on sequence task_state_counts_id_seq to taskmgr_api;
grant update (due_at, payload) on tasks to taskmgr_api;
-- Task types, for admin tokens (create, update, soft delete, restore).
grant insert, update on task_types to taskmgr_api;
-- Tokens: looked up by hash; last use recorded. Never inserted or revoked by the API.
grant select (id, name, scope, secret_sha256, revoked_at, last_used_at) on api_tokens to taskmgr_api;
grant update (last_used_at) on api_tokens to taskmgr_api;
-- Readers (dashboards) may list the tokens but not their hashes.
grant select (id, name, scope, created_at, created_by, revoked_at, last_used_at) on api_tokens to taskmgr_reader;
