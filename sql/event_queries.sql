-- Named queries of the event history (sql/0012), loaded by taskmgr/event_store.py.

-- record_events --
-- One statement per batch: the ids go into emitted_event_ids first (ordered, so two
-- recorders inserting overlapping batches lock in the same order and never deadlock);
-- only the rows whose id was new reach the hypertable. The batch has one row per id.
with batch as (
    select * from unnest(
        cast(:event_ids as uuid[]), cast(:times as timestamptz[]), cast(:kinds as text[]),
        cast(:task_types as text[]), cast(:task_ids as uuid[]), cast(:root_task_ids as uuid[]),
        cast(:runner_ids as text[]), cast(:attempts as integer[]), cast(:versions as integer[]),
        cast(cast(:datas as text[]) as jsonb[])
    ) as b(event_id, time, kind, task_type, task_id, root_task_id, runner_id, attempt, version, data)
), fresh as (
    insert into emitted_event_ids (event_id, time)
    select event_id, time from batch order by event_id
    on conflict (event_id) do nothing
    returning event_id
)
insert into emitted_events
    (time, event_id, kind, task_type, task_id, root_task_id, runner_id, attempt, version, data)
select b.time, b.event_id, b.kind, b.task_type, b.task_id, b.root_task_id, b.runner_id, b.attempt,
       b.version, b.data
from batch b join fresh using (event_id);

-- events_of_task --
select time, event_id, kind, task_type, task_id, root_task_id, runner_id, attempt, version, data
from emitted_events
where task_id = :task_id and time >= :since
  and (cardinality(cast(:kinds as text[])) = 0 or kind = any(cast(:kinds as text[])))
order by time, event_id
limit :limit;

-- events_of_root --
select time, event_id, kind, task_type, task_id, root_task_id, runner_id, attempt, version, data
from emitted_events
where root_task_id = :root_id and time >= :since
  and (cardinality(cast(:kinds as text[])) = 0 or kind = any(cast(:kinds as text[])))
order by time, event_id
limit :limit;

-- events_after --
-- The history in (time, event_id) order from a point, a page at a time (keyset): a
-- replay from the hypertable.
select time, event_id, kind, task_type, task_id, root_task_id, runner_id, attempt, version, data
from emitted_events
where (time, event_id) > (cast(:time as timestamptz), cast(:event_id as uuid))
order by time, event_id
limit :limit;

-- event_counts --
select count(*) as events, count(distinct event_id) as ids from emitted_events;

-- drop_old_emitted_events --
-- Through a SECURITY DEFINER function (sql/0012): drop_chunks needs the table's owner.
select taskmgr_drop_old_emitted_events(cast(:older_than as timestamptz));

-- take_lifecycle --
-- The oldest unpublished state changes, read without a lock: the relay publishes them,
-- then deletes them (delete_lifecycle) once the broker confirmed every one. No
-- transaction stays open while it waits for the confirms; a crash or a failed publish
-- in between leaves the rows to be published again (repeats carry the same event id).
-- A row whose task is gone (pruned, or truncated by hand) has no type or root to publish
-- with: its type comes back null and the relay deletes it unpublished.
select o.id, o.seq, o.time, o.task_id, o.state, o.attempt, o.runner_id, o.source, o.detail,
       t.type, t.root_id
from (select * from lifecycle_outbox order by id limit :limit) o
left join tasks t on t.id = o.task_id
order by o.id;

-- delete_lifecycle --
delete from lifecycle_outbox where id = any(:ids);

-- lifecycle_outbox_age --
-- Seconds since the oldest row still in the outbox was written (no row: none waits). The
-- primary key's first entry: one index probe, however large the outbox grew.
select extract(epoch from clock_timestamp() - time) as age
from lifecycle_outbox order by id limit 1;
