-- Named queries, loaded by taskmgr/queries.py: "-- name --" then the SQL.
-- Only taskmgr/store.py runs them.

-- insert_type --
-- {columns} and {values}: the task type's declared fields (taskmgr.models.TaskTypeFields),
-- filled in by taskmgr/store.py.
insert into task_types ({columns})
values ({values})
on conflict (name) do nothing
returning *;

-- update_type --
-- {assignments}: every declared field but the name (taskmgr/store.py fills them in).
update task_types set {assignments}, updated_at = now()
where name = :name
returning *;

-- get_type --
select * from task_types where name = :name;

-- get_types --
select * from task_types where name = any(cast(:names as text[]));

-- get_type_for_update --
select * from task_types where name = :name for update;

-- list_types --
select * from task_types where (:include_deleted or deleted_at is null) order by name;

-- set_type_deleted --
update task_types set deleted_at = case when :deleted then now() else null end, updated_at = now()
where name = :name
returning *;

-- insert_tasks --
-- Bulk insert; a dedup key that exists already inserts nothing (returned ids are the new ones).
insert into tasks (id, type, payload, due_at, parent_id, root_id, dedup_key, recurrence,
    occurrence, created_by, name, description, priority, on_dependency_failure)
select t.id, t.type, t.payload::jsonb, t.due_at, t.parent_id, t.root_id, t.dedup_key,
    t.recurrence::jsonb, t.occurrence, t.created_by, t.name, t.description, t.priority,
    t.on_dependency_failure
from unnest(cast(:ids as uuid[]), cast(:types as text[]), cast(:payloads as text[]),
    cast(:due_ats as timestamptz[]), cast(:parent_ids as uuid[]), cast(:root_ids as uuid[]),
    cast(:dedup_keys as text[]), cast(:recurrences as text[]), cast(:occurrences as int[]),
    cast(:created_bys as text[]), cast(:names as text[]), cast(:descriptions as text[]),
    cast(:priorities as smallint[]), cast(:on_dependency_failures as text[]))
    as t(id, type, payload, due_at, parent_id, root_id, dedup_key, recurrence, occurrence, created_by,
         name, description, priority, on_dependency_failure)
on conflict (dedup_key) do nothing
returning id;

-- ids_by_dedup_key --
select dedup_key, id from tasks where dedup_key = any(cast(:keys as text[]));

-- insert_states --
-- run_at null: waiting for its dependencies (sql/0016).
insert into task_state (task_id, state, attempt, run_at, changed_at, priority)
select t.task_id, 'SCHEDULED', 0, t.run_at, :now, t.priority
from unnest(cast(:ids as uuid[]), cast(:run_ats as timestamptz[]), cast(:priorities as smallint[]))
    as t(task_id, run_at, priority);

-- insert_events --
insert into task_events (time, task_id, state, attempt, runner_id, source, applied, detail)
select :now, e.task_id, e.state, e.attempt, e.runner_id, e.source, e.applied, e.detail::jsonb
from unnest(cast(:ids as uuid[]), cast(:states as text[]), cast(:attempts as int[]),
    cast(:runner_ids as text[]), cast(:sources as text[]), cast(:applieds as boolean[]),
    cast(:details as text[]))
    as e(task_id, state, attempt, runner_id, source, applied, detail);

-- lock_states --
select s.task_id, s.state, s.attempt, s.failures, s.runner_id, s.run_at, t.type, t.root_id, s.started_at
from task_state s join tasks t on t.id = s.task_id
where s.task_id = any(cast(:ids as uuid[]))
order by s.task_id
for update of s;

-- update_states --
update task_state s set state = u.state, attempt = u.attempt, failures = u.failures,
    run_at = u.run_at, runner_id = u.runner_id, started_at = u.started_at,
    sent_at = case when u.state = 'STARTED' then null else s.sent_at end,
    changed_at = :now
from unnest(cast(:ids as uuid[]), cast(:states as text[]), cast(:attempts as int[]),
    cast(:failures as int[]), cast(:run_ats as timestamptz[]), cast(:runner_ids as text[]),
    cast(:started_ats as timestamptz[]))
    as u(task_id, state, attempt, failures, run_at, runner_id, started_at)
where s.task_id = u.task_id;

-- claim_due --
-- The due tasks, oldest first (then the higher priority first), locked so that
-- overlapping managers never claim one twice, with what a start order and a recurrence
-- need (the dispatcher decides each one's change). Cost: the entries of
-- task_state_due_idx (run_at, priority desc) up to :now, in its order: not the history.
select s.task_id, s.state, s.attempt, s.failures, s.runner_id, s.run_at, s.started_at, t.type, t.payload,
    t.due_at, t.root_id, t.recurrence, t.occurrence, t.dedup_key, t.created_by, t.created_at,
    t.name, t.description, t.priority,
    tt.pool, tt.handler, tt.url_template, tt.poll_interval_s, tt.request_timeout_s,
    tt.max_consecutive_failures, tt.misfire_policy, tt.misfire_grace_s, tt.start_timeout_s,
    tt.max_runtime_s
from task_state s join tasks t on t.id = s.task_id join task_types tt on tt.name = t.type
where s.state in ('SCHEDULED', 'RETRYING') and s.run_at <= :now
order by s.run_at, s.priority desc
limit :limit
for update of s skip locked;

-- start_due --
-- Claim and start due one-off tasks in one statement: lock them (skipping rows another
-- manager holds), move them SCHEDULED/RETRYING -> STARTED (the only edges the WHERE
-- admits) with the order unsent, append their STARTED events, and return what a start
-- order needs. Recurring tasks take claim_due (next occurrence, misfire policy). Oldest
-- first, then the higher priority: the order of task_state_due_idx, so no sort.
with due as (
    select s.task_id, s.attempt, s.run_at
    from task_state s join tasks t on t.id = s.task_id
    where s.state in ('SCHEDULED', 'RETRYING') and s.run_at <= :now and t.recurrence is null
    order by s.run_at, s.priority desc
    limit :limit
    for update of s skip locked
), started as (
    update task_state s set state = 'STARTED', attempt = due.attempt + 1, run_at = null,
        runner_id = null, sent_at = null, changed_at = :now, started_at = coalesce(s.started_at, :now)
    from due where s.task_id = due.task_id
    returning s.task_id, s.attempt, s.started_at, due.run_at
), claimed as (
    -- Lateness counts from when the task could first have started (see dispatch.py).
    select st.task_id, st.attempt, st.started_at, t.type, t.payload, t.due_at, t.root_id,
        round(extract(epoch from (cast(:now as timestamptz) - greatest(st.run_at, t.created_at))) * 1000)
            as lateness_ms,
        tt.pool, tt.handler, tt.url_template, tt.poll_interval_s, tt.request_timeout_s,
        tt.max_consecutive_failures, tt.start_timeout_s, tt.max_runtime_s
    from started st join tasks t on t.id = st.task_id join task_types tt on tt.name = t.type
), events as (
    insert into task_events (time, task_id, state, attempt, source, detail)
    select :now, c.task_id, 'STARTED', c.attempt, 'manager', jsonb_build_object('lateness_ms', c.lateness_ms)
    from claimed c
)
select * from claimed;

-- start_orders --
-- What a runner needs to start each (task, attempt) still waiting in the outbox.
select s.task_id, s.attempt, s.changed_at, s.started_at, t.type, t.payload, t.root_id, t.due_at,
    tt.pool, tt.handler, tt.url_template, tt.poll_interval_s, tt.request_timeout_s,
    tt.max_consecutive_failures, tt.start_timeout_s, tt.max_runtime_s
from task_state s join tasks t on t.id = s.task_id join task_types tt on tt.name = t.type
where s.task_id = any(cast(:ids as uuid[])) and s.state = 'STARTED' and s.sent_at is null;

-- outbox --
-- Start orders claimed but not confirmed by the broker (a crash between commit and publish).
select s.task_id from task_state s
where s.state = 'STARTED' and s.sent_at is null and s.changed_at <= :before
order by s.changed_at
limit :limit
for update of s skip locked;

-- mark_sent --
update task_state s set sent_at = :now
from unnest(cast(:ids as uuid[]), cast(:attempts as int[])) as u(task_id, attempt)
where s.task_id = u.task_id and s.attempt = u.attempt and s.state = 'STARTED';

-- get_task --
select t.*, s.state, s.attempt, s.failures, s.runner_id, s.changed_at, s.run_at,
    array(select d.depends_on from task_dependencies d where d.task_id = t.id order by d.depends_on)
        as depends_on
from tasks t join task_state s on s.task_id = t.id
where t.id = :id;

-- list_tasks --
select t.*, s.state, s.attempt, s.failures, s.runner_id, s.changed_at, s.run_at,
    array(select d.depends_on from task_dependencies d where d.task_id = t.id order by d.depends_on)
        as depends_on
from tasks t join task_state s on s.task_id = t.id
where (cast(:type as text) is null or t.type = :type)
  and (cast(:state as text) is null or s.state = :state)
  and (cast(:root_id as uuid) is null or t.root_id = :root_id)
  and (cast(:due_from as timestamptz) is null or t.due_at >= :due_from)
  and (cast(:due_to as timestamptz) is null or t.due_at < :due_to)
  and (cast(:after_due as timestamptz) is null or (t.due_at, t.id) > (:after_due, :after_id))
order by t.due_at, t.id
limit :limit;

-- history --
select time, task_id, state, attempt, runner_id, source, applied, detail
from task_events where task_id = :id
order by seq;

-- tree_events --
select e.time, e.task_id, e.state, e.attempt, e.runner_id, e.source, e.applied, e.detail
from task_events e
where e.task_id in (select id from tasks where root_id = :root_id)
order by e.seq;

-- upsert_runner --
insert into runners (id, pool, host, pid, started_at, last_seen, tasks)
values (:id, :pool, :host, :pid, :now, :now, :tasks)
on conflict (id) do update set last_seen = excluded.last_seen, tasks = excluded.tasks,
    dead = false, stopped_at = null;

-- stop_runner --
update runners set stopped_at = :now, last_seen = :now, tasks = 0 where id = :id;

-- dead_runners --
-- Runners whose heartbeats stopped: marked dead once, returned once. :heard lists the
-- runners whose heartbeat reached the leader since :before, applied or not yet. Rows are locked in
-- id order, as the intake locks them (runners rows first, by id; then task_state rows).
update runners set dead = true
where id in (
    select id from runners
    where not dead and stopped_at is null and last_seen < :before
        and id <> all(cast(:heard as text[]))
    order by id
    for update
)
returning id, pool;

-- live_runners_by_pool --
-- Live runners (as active_runners counts them) per pool, and 0 for the pool of a task type
-- that has none: the "no live runner in a pool" alert. Reads the partial index of runners
-- not stopped and not dead (sql/0021) and the task types, not every runner ever seen.
select p.pool, count(r.id) as n
from (
    select pool from task_types where deleted_at is null
    union
    select pool from runners where not dead and stopped_at is null
) p
left join runners r
    on r.pool = p.pool and not r.dead and r.stopped_at is null and r.last_seen >= :since
group by p.pool;

-- active_runners --
select id, pool, host, pid, started_at, last_seen, tasks from runners
where not dead and stopped_at is null and last_seen >= :since
order by id;

-- tasks_of_runners --
select s.task_id from task_state s
where s.state in ('STARTED', 'RUNNING') and s.runner_id = any(cast(:runner_ids as text[]));

-- runner_deaths --
-- For tasks RUNNING on runners just declared dead: how long after the task became
-- RUNNING there (task_state.changed_at) the runner's last heartbeat came (a death soon
-- after the start counts toward the bound, see manager/recovery.py), and its type's
-- poll interval and request timeout, from which that window is derived.
select s.task_id, extract(epoch from r.last_seen - s.changed_at)::float8 as held_s,
    tt.poll_interval_s, tt.request_timeout_s
from task_state s join runners r on r.id = s.runner_id
join tasks t on t.id = s.task_id join task_types tt on tt.name = t.type
where s.task_id = any(cast(:ids as uuid[])) and s.state = 'RUNNING';

-- runner_holdings --
-- What the manager thinks a runner holds that its heartbeat (:held) does not list. Only
-- the differences leave the server: a heartbeat lists up to 10,000 tasks every 3 s.
select s.task_id, s.attempt, s.state, s.changed_at from task_state s
where s.state in ('STARTED', 'RUNNING') and s.runner_id = :runner_id
    and s.task_id not in (select unnest(cast(:held as uuid[])));

-- not_held_by --
-- Of the (task, attempt) pairs a runner's heartbeat lists, those that are not its own:
-- an unknown task, another attempt, or a state in which the task is not this runner's.
select u.task_id, u.attempt
from unnest(cast(:ids as uuid[]), cast(:attempts as int[])) as u(task_id, attempt)
left join task_state s on s.task_id = u.task_id
where s.task_id is null or s.attempt <> u.attempt
    or not (s.state = 'STARTED' or (s.state = 'RUNNING' and s.runner_id = :runner_id));

-- start_timeouts --
-- Sent start orders no runner took within their type's start timeout. Cost: the entries
-- of task_state_start_timeout_idx (sent orders not yet taken) older than the smallest
-- start timeout of any type, not every task ever stored.
select s.task_id from task_state s join tasks t on t.id = s.task_id
join task_types tt on tt.name = t.type
where s.state = 'STARTED' and s.sent_at is not null
  and s.sent_at < cast(:now as timestamptz)
      - (select make_interval(secs => min(start_timeout_s)) from task_types)
  and s.sent_at < cast(:now as timestamptz) - make_interval(secs => tt.start_timeout_s)
limit :limit;

-- upsert_service --
insert into task_services (task_id, service, attempt, state, detail, updated_at)
values (:task_id, :service, :attempt, :state, cast(:detail as jsonb), :now)
on conflict (task_id, service) do update set attempt = excluded.attempt,
    state = excluded.state, detail = excluded.detail, updated_at = excluded.updated_at;

-- services_of --
select service, attempt, state, detail from task_services where task_id = :task_id;

-- sync_scope --
-- Tasks filed under a schedule scope (dedup keys "<scope>/<key>", or "<scope>/<key>#<n>"
-- for a game revived after the schedule cancelled it), with their state and who made
-- their last change.
select t.id, t.dedup_key, t.due_at, s.state,
    (select e.source from task_events e where e.task_id = t.id and e.applied
     order by e.seq desc limit 1) as last_source
from tasks t join task_state s on s.task_id = t.id
where t.dedup_key like :prefix escape '\';

-- lock_scope --
-- Two syncs of one schedule scope take turns (until the end of the transaction).
select pg_advisory_xact_lock(hashtext(:scope));

-- notify --
-- Delivered to the listeners at commit, and not at all on rollback (taskmgr/db.py listens).
select pg_notify(:channel, :payload);

-- drop_chunks --
-- Through a SECURITY DEFINER function (sql/0003): drop_chunks needs the table's owner.
select taskmgr_drop_old_events(cast(:older_than as timestamptz));

-- leader_present --
select exists (select 1 from taskmgr_leader where expires_at > now()) as present;

-- lock_lease --
-- A campaign's first statement: FOR UPDATE, the one row lock that conflicts with the
-- fence's FOR KEY SHARE, so a takeover waits for the write transactions that checked a
-- live lease to end (the renewal, a plain update, does not: it never waits for them).
select id from taskmgr_leader for update;

-- campaign --
-- Take the lease when there is none or it has expired: a new term. Returns the term, or
-- nothing when another manager holds a live lease.
insert into taskmgr_leader (id, holder, term, expires_at, renewed_at)
values (true, :holder, 1, now() + make_interval(secs => :lease_s), now())
on conflict (id) do update set holder = excluded.holder, term = taskmgr_leader.term + 1,
    expires_at = excluded.expires_at, renewed_at = excluded.renewed_at
where taskmgr_leader.expires_at <= now()
returning term;

-- renew --
-- Extend this term's lease while it is still live; nothing returned: the lease is lost.
-- The holder is checked with the term: after a failover to a replica that had not
-- received a campaign's commit, the new primary hands out the same term number again,
-- to another manager (docs/design.md, "PostgreSQL failover").
update taskmgr_leader set expires_at = now() + make_interval(secs => :lease_s), renewed_at = now()
where term = :term and holder = :holder and expires_at > now()
returning term;

-- resign --
update taskmgr_leader set expires_at = now() where term = :term and holder = :holder;

-- fence --
-- In each of the leader's write transactions: its term still holds a live lease. The
-- key-share lock makes a takeover (lock_lease: FOR UPDATE) wait for the transaction to
-- end, and lets the leader's own renewal (an update of expires_at) go through meanwhile:
-- with FOR SHARE the renewal waited for every long write of the leader (an intake batch
-- on a starved server), and the leader lost its lease to its own work.
select term from taskmgr_leader where term = :term and holder = :holder and expires_at > now()
for key share;

-- states_of --
select task_id, state from task_state where task_id = any(cast(:ids as uuid[]));

-- counts_by_type_and_state --
select t.type, s.state, count(*) as n from tasks t join task_state s on s.task_id = t.id
group by 1, 2 order by 1, 2;

-- lateness_ms --
-- Due (or retry) time to STARTED, per start, over a time window.
select (detail->>'lateness_ms')::float as ms from task_events
where state = 'STARTED' and time >= :since and detail ? 'lateness_ms';

-- due_probe --
-- After a claim that left room in its batch: when the earliest waiting task is due (the
-- manager sleeps until then at most), and whether a recurring task is due now (only then
-- does the dispatcher run claim_due). Cost: the first entry of task_state_due_idx and
-- its entries up to :now, what is due, not what is stored.
select
    (select min(run_at) from task_state where state in ('SCHEDULED', 'RETRYING')) as next_at,
    exists(
        select 1 from task_state s join tasks t on t.id = s.task_id
        where s.state in ('SCHEDULED', 'RETRYING') and s.run_at <= :now and t.recurrence is not null
    ) as recurring_due;

-- rebuild_state --
-- The projection again from the history: each task's last applied event (tasks whose
-- history retention has dropped keep their row). STARTED orders come back unsent, so
-- the relay sends them again (runners drop repeats).
with last as (
    select distinct on (task_id) task_id, state, attempt, runner_id, time, detail, seq
    from task_events where applied
    order by task_id, seq desc
), failures as (
    select distinct on (task_id) task_id, (detail->>'failures')::int as n
    from task_events where applied and detail ? 'failures'
    order by task_id, seq desc
)
update task_state s set
    state = l.state,
    attempt = l.attempt,
    failures = coalesce(f.n, 0),
    runner_id = case when l.state in ('SCHEDULED', 'STARTED', 'RETRYING') then null else l.runner_id end,
    -- SCHEDULED: its due time, or null while it waits for its dependencies (created
    -- waiting and not released since); RETRYING: its retry time, or the time an
    -- operator moved it to since (TaskService.reschedule).
    run_at = case l.state
        when 'SCHEDULED' then case when exists (
                select 1 from task_events w where w.task_id = l.task_id and w.detail ? 'waiting_for')
            and not exists (
                select 1 from task_events r where r.task_id = l.task_id and r.detail ? 'released')
            then null else t.due_at end
        when 'RETRYING' then coalesce(
            (select (m.detail->>'run_at')::timestamptz from task_events m
             where m.task_id = l.task_id and m.seq > l.seq and not m.applied and m.state = 'RETRYING'
               and m.detail ? 'moved_from'
             order by m.seq desc limit 1),
            (l.detail->>'retry_at')::timestamptz, l.time) end,
    sent_at = null,
    changed_at = l.time,
    -- The first STARTED since the last manual retry (max_runtime_s counts from it).
    started_at = (
        select min(e.time) from task_events e
        where e.task_id = s.task_id and e.applied and e.state = 'STARTED'
          and e.seq > coalesce((select max(r.seq) from task_events r where r.task_id = s.task_id
                                and r.applied and r.detail->>'reason' = 'manual retry'), 0))
from last l join tasks t on t.id = l.task_id left join failures f on f.task_id = l.task_id
where s.task_id = l.task_id;

-- leader_name --
-- The holder of the live lease (taskmgr-leader-<host>-<pid>).
select holder from taskmgr_leader where expires_at > now();

-- roots_of --
select id, root_id from tasks where id = any(cast(:ids as uuid[]));

-- allow_rebuild --
-- For this transaction only: let rebuild_state move rows to what the history says even
-- off the state machine's edges (sql/0009's trigger; never for taskmgr_manager).
select set_config('taskmgr.rebuild', 'on', true);

-- recoveries --
-- How many times recovery took each of these tasks back for this reason (runner_dead,
-- start_timeout): past a bound the task fails instead. since_running: only those since
-- the task last reached RUNNING (undelivered orders count in a row; deaths do not reset).
-- A recovery whose detail says counted=false (a runner death long after the task
-- started on it) is not counted; one without the key (before it existed) is.
select e.task_id, count(*) as n from task_events e
where e.task_id = any(cast(:ids as uuid[])) and e.applied and e.detail->>'recovery' = :label
  and coalesce(cast(e.detail->>'counted' as boolean), true)
  and (not cast(:since_running as boolean) or e.seq > coalesce((
      select max(r.seq) from task_events r
      where r.task_id = e.task_id and r.applied and r.state = 'RUNNING'), 0))
group by e.task_id;
