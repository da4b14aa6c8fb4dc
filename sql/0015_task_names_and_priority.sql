-- Tasks get a name and a description (for people: the engine reads neither) and a
-- priority that orders the claims of tasks due at the same time.
--
-- Priority: higher first, -32768..32767, default 0. It orders only tasks due at the same
-- instant: the claim reads the waiting tasks by due time, then priority. It is copied
-- into task_state (written once, with the row) so that the claim's partial index holds
-- both keys and a claim still reads only the index entries of what is due, in order,
-- with no sort (the index was on run_at alone).

alter table tasks
    add column name        text check (name <> '' and length(name) <= 200),
    add column description text check (length(description) <= 4000),
    add column priority    smallint not null default 0;
comment on column tasks.name is 'A name for people (optional; not unique: dedup_key is the idempotency key).';
comment on column tasks.description is 'What the task is for, for people (optional).';
comment on column tasks.priority is 'Among tasks due at the same time, higher is claimed first (default 0).';

alter table task_state add column priority smallint not null default 0;
comment on column task_state.priority is 'tasks.priority, copied when the row is written: a key of task_state_due_idx.';

drop index task_state_due_idx;
create index task_state_due_idx on task_state (run_at, priority desc)
    where state in ('SCHEDULED', 'RETRYING');
