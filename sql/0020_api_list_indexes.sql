-- The indexes the API's task listing needs (store.list_tasks: filters on type, state,
-- root, a due range; ordered by (due_at, id) with a keyset cursor). Without them a page
-- of a million tasks sorts every match (plans in docs/benchmarks.md, `taskmgr bench api`).
--   tasks (due_at, id):       an unfiltered page, or one by due range, reads its rows in order.
--   tasks (type, due_at, id): a page of one type, in order.
--   task_state where FAILED:  the failed tasks, few, found by their own rows then sorted.
--                             The other rare states have theirs already (SCHEDULED and
--                             RETRYING: task_state_due_idx; STARTED and RUNNING:
--                             task_state_active_idx); the common ones (FINISHED,
--                             CANCELLED) are read through tasks (due_at, id).
-- The two on tasks add to every insert of a task; the partial one changes only when a
-- task fails or is retried.
create index tasks_due_idx on tasks (due_at, id);
create index tasks_type_due_idx on tasks (type, due_at, id);
create index task_state_failed_idx on task_state (task_id) where state = 'FAILED';
