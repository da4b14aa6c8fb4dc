-- Named queries of upkeep (taskmgr/upkeep.py): the counts by state (kept, counted, and
-- per time bucket from the history), expiries, pruning.
-- "-- name --" then the SQL, as sql/queries.sql.

-- state_counts --
-- Tasks by state: the sum of the deltas the triggers of sql/0017 wrote (a few rows per
-- state since the last fold), not a count of every task stored.
select state, sum(n)::bigint as n from task_state_counts group by state having sum(n) <> 0;

-- counts_by_state --
-- Counts every task stored: for an operator's question about one type. The periodic
-- gauges read state_counts (above), kept by triggers (sql/0017).
select s.state, count(*) as n
from task_state s join tasks t on t.id = s.task_id
where (cast(:type as text) is null or t.type = :type)
group by s.state;

-- counts_per_bucket --
select time_bucket(cast(:bucket as interval), time) as bucket, state, count(*) as n
from task_events
where applied and time >= :since and time < :until
group by bucket, state
order by bucket, state;

-- fold_state_counts --
-- One row per state again: the deltas committed so far, summed (a delta of a transaction
-- still open is not seen, and waits for the next fold). Two folds at once are safe: the
-- second skips the rows the first deleted.
with moved as (delete from task_state_counts returning state, n)
insert into task_state_counts (state, n)
select state, sum(n) from moved group by state having sum(n) <> 0;

-- expired --
-- Active tasks past their type's max_runtime_s since their first start. Cost: the
-- entries of task_state_runtime_idx (active tasks by first start) older than the
-- smallest max_runtime_s of any type: none at all while no type has a limit.
select s.task_id, s.state, s.attempt, s.runner_id, s.started_at, tt.pool, tt.max_runtime_s
from task_state s join tasks t on t.id = s.task_id join task_types tt on tt.name = t.type
where s.state in ('STARTED', 'RUNNING')
  and s.started_at < cast(:now as timestamptz)
      - (select make_interval(secs => min(max_runtime_s)) from task_types)
  and tt.max_runtime_s is not null
  and s.started_at < cast(:now as timestamptz) - make_interval(secs => tt.max_runtime_s)
order by s.started_at
limit :limit;

-- prune_tasks --
-- Through a SECURITY DEFINER function (sql/0017): whole trees of old terminal tasks.
select pruned, scanned, last_at, last_id
from taskmgr_prune_tasks(cast(:older_than as timestamptz), cast(:after_at as timestamptz),
    cast(:after_id as uuid), :max_tasks);

-- prune_runners --
select taskmgr_prune_runners(cast(:older_than as timestamptz));
