-- Tasks that end, tables that stay small (issue 14, items 3 and 7).
--
-- 1. task_types.max_runtime_s: how long a task of the type may run, counted from its
--    first STARTED (task_state.started_at, below); null: no limit. Past it the runner
--    stops the poller and recovery ends the task FAILED, reason `expired`, for good.
-- 2. task_state.started_at: the task's first STARTED since it was created (or since an
--    operator's manual retry, which starts the count again). Retries and recoveries
--    keep it: max_runtime_s bounds the task's whole run, not one attempt.
-- 3. Indexes for the recovery scans, so they cost what is active, not what is stored:
--    start timeouts (sent orders not taken) and expiries (active tasks by first start).
--    task_state_ended_idx finds the terminal tasks past retention for pruning.
-- 4. task_state_counts: tasks by state, kept by statement triggers on task_state in the
--    transaction of each change, as rows of deltas (no hot row that writers would queue
--    on, and no lock order between them); the leader folds them into one row per state
--    with the gauges, every 15 s. A count is sum(n) by state.
-- 5. Pruning through SECURITY DEFINER functions (the manager's role deletes nothing
--    itself): whole trees of terminal tasks past retention, never newer than the
--    owner's floor (taskmgr_policy.min_retention_days), and runners stopped or dead
--    long ago.

alter table task_types add column max_runtime_s double precision check (max_runtime_s > 0);
comment on column task_types.max_runtime_s is 'Longest run of a task, from its first STARTED; past it the task ends FAILED (reason expired). Null: no limit.';

alter table task_state add column started_at timestamptz;
comment on column task_state.started_at is 'The first STARTED of the task (since its creation or an operator''s retry): max_runtime_s counts from here.';
update task_state s set started_at = (
    select min(e.time) from task_events e where e.task_id = s.task_id and e.applied and e.state = 'STARTED')
where s.state in ('STARTED', 'RUNNING', 'RETRYING');

create index task_state_start_timeout_idx on task_state (sent_at) where state = 'STARTED' and sent_at is not null;
create index task_state_runtime_idx on task_state (started_at) where state in ('STARTED', 'RUNNING');
create index task_state_ended_idx on task_state (changed_at, task_id)
    where state in ('FINISHED', 'FAILED', 'CANCELLED');

create table task_state_counts (
    id      bigserial primary key,
    state   text not null,
    n       bigint not null
);
comment on table task_state_counts is 'Tasks by state as deltas (sum(n) by state), written by triggers on task_state in the transaction of each change; the leader folds them.';

create function taskmgr_count_states() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        insert into task_state_counts (state, n) select state, count(*) from new_rows group by state;
    elsif tg_op = 'DELETE' then
        insert into task_state_counts (state, n) select state, -count(*) from old_rows group by state;
    elsif tg_op = 'UPDATE' then
        insert into task_state_counts (state, n)
        select state, sum(d) from (
            select state, 1 as d from new_rows union all select state, -1 from old_rows) x
        group by state having sum(d) <> 0;
    else  -- TRUNCATE
        delete from task_state_counts;
    end if;
    return null;
end $$;
create trigger task_state_count_insert after insert on task_state
    referencing new table as new_rows for each statement execute function taskmgr_count_states();
create trigger task_state_count_update after update on task_state
    referencing old table as old_rows new table as new_rows for each statement
    execute function taskmgr_count_states();
create trigger task_state_count_delete after delete on task_state
    referencing old table as old_rows for each statement execute function taskmgr_count_states();
create trigger task_state_count_truncate after truncate on task_state
    for each statement execute function taskmgr_count_states();
insert into task_state_counts (state, n) select state, count(*) from task_state group by state;

-- Whole trees only: a tree is pruned when every task in it is terminal and changed
-- before the cutoff, and no task of a tree kept depends on one of its tasks. Scans at most max_tasks old terminal tasks (task_state_ended_idx,
-- after the cursor after_at/after_id), locks the state and task rows of their trees,
-- checks again under the locks (an operator's retry of a FAILED task, a child written
-- meanwhile) and deletes those trees: task_services, task_state, tasks (and, by their
-- foreign keys' ON DELETE, the rows of other parts that name a task). Returns the tasks
-- pruned, the tasks scanned and the cursor to go on from.
create function taskmgr_prune_tasks(older_than timestamptz, after_at timestamptz, after_id uuid, max_tasks integer)
    returns table (pruned bigint, scanned bigint, last_at timestamptz, last_id uuid)
    language plpgsql security definer set search_path = public, pg_temp as $$
declare
    cutoff timestamptz := least(older_than,
        now() - make_interval(days => (select min_retention_days from taskmgr_policy)));
    roots uuid[];
    doomed uuid[];
begin
    select count(*), max(c.changed_at), (array_agg(c.task_id order by c.changed_at desc, c.task_id desc))[1],
           array_agg(distinct t.root_id)
    into scanned, last_at, last_id, roots
    from (select s.task_id, s.changed_at from task_state s
          where s.state in ('FINISHED', 'FAILED', 'CANCELLED') and s.changed_at < cutoff
            and (s.changed_at, s.task_id) > (coalesce(after_at, '-infinity'), coalesce(after_id, '00000000-0000-0000-0000-000000000000'::uuid))
          order by s.changed_at, s.task_id
          limit max_tasks) c
    join tasks t on t.id = c.task_id;
    pruned := 0;
    if scanned = 0 then
        return next;
        return;
    end if;
    perform 1 from tasks t join task_state s on s.task_id = t.id
    where t.root_id = any(roots) order by t.id for update of s, t;
    select array_agg(distinct t.root_id) into roots from tasks t
    where t.root_id = any(roots) and t.root_id not in (
        select t2.root_id from tasks t2 join task_state s on s.task_id = t2.id
        where t2.root_id = any(roots)
          and (s.state not in ('FINISHED', 'FAILED', 'CANCELLED') or s.changed_at >= cutoff));
    -- A tree one of whose tasks a task of a tree kept depends on (sql/0016) is kept too:
    -- the dependency stays on record while its dependent does.
    select array_agg(t.id) into doomed from tasks t
    where t.root_id = any(roots) and t.root_id not in (
        select t3.root_id from tasks t3 join task_dependencies d on d.depends_on = t3.id
        join tasks t4 on t4.id = d.task_id
        where t3.root_id = any(roots) and not (t4.root_id = any(roots)));
    if doomed is not null then
        delete from task_services where task_id = any(doomed);
        delete from task_state where task_id = any(doomed);
        delete from tasks where id = any(doomed);
        pruned := cardinality(doomed);
    end if;
    return next;
end $$;
revoke all on function taskmgr_prune_tasks(timestamptz, timestamptz, uuid, integer) from public;

create function taskmgr_prune_runners(older_than timestamptz) returns integer
    language sql security definer set search_path = public, pg_temp as $$
    with gone as (
        delete from runners where (dead or stopped_at is not null) and last_seen < older_than returning 1)
    select count(*)::integer from gone
$$;
revoke all on function taskmgr_prune_runners(timestamptz) from public;

grant execute on function taskmgr_prune_tasks(timestamptz, timestamptz, uuid, integer) to taskmgr_manager;
grant execute on function taskmgr_prune_runners(timestamptz) to taskmgr_manager;
grant select, insert, delete on task_state_counts to taskmgr_manager;
grant usage on sequence task_state_counts_id_seq to taskmgr_manager;
grant select on task_state_counts to taskmgr_reader;
