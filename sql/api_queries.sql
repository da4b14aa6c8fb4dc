-- Named queries of the HTTP API (sql/0019), loaded by taskmgr/tokens.py and
-- taskmgr/views.py.

-- insert_token --
insert into api_tokens (id, name, scope, secret_sha256, created_by)
values (:id, :name, :scope, :hash, :created_by)
on conflict (name) do nothing
returning id, name, scope, created_at, created_by, revoked_at, last_used_at;

-- token_by_hash --
select id, name, scope, revoked_at, last_used_at from api_tokens where secret_sha256 = :hash;

-- touch_token --
-- At most once a minute per token: a busy client does not write on every request.
update api_tokens set last_used_at = :now
where id = :id and (last_used_at is null or last_used_at < cast(:now as timestamptz) - interval '1 minute');

-- revoke_token --
update api_tokens set revoked_at = :now
where name = :name and revoked_at is null
returning id, name, scope, created_at, created_by, revoked_at, last_used_at;

-- token_named --
select id, name, scope, created_at, created_by, revoked_at, last_used_at from api_tokens where name = :name;

-- list_tokens --
select id, name, scope, created_at, created_by, revoked_at, last_used_at from api_tokens
order by created_at, name;

-- list_runners --
-- Every runner the heartbeats showed since :since (the dead and stopped too, marked so).
select id, pool, host, pid, started_at, last_seen, stopped_at, tasks, dead from runners
where last_seen >= :since
order by pool, id;

-- lateness_histogram --
-- Due (or retry) time to STARTED, per start since :since, in buckets of :width ms
-- (the last bucket holds everything past the others).
select least(floor((detail->>'lateness_ms')::float / :width), :buckets - 1)::int as bucket,
       count(*) as n
from task_events
where state = 'STARTED' and applied and time >= :since and detail ? 'lateness_ms'
group by bucket
order by bucket;

-- schema_version --
select max(version) as version from schema_migrations;

-- runner_poll_errors --
-- Failed polls per runner since :since: the runners report each (kept in the history,
-- not applied).
select runner_id, count(*) as n from task_events
where time >= :since and not applied and runner_id is not null and detail->>'report' = 'poll_error'
group by runner_id;
