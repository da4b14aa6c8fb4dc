-- Leadership as a lease with an expiry (as River's leader table), instead of an advisory
-- lock: PostgreSQL keeps a frozen leader's idle connection, and with it an advisory
-- lock, for as long as TCP keepalives say the host lives (a SIGSTOPped process's kernel
-- still answers them). A lease expires unless renewed, so leadership passes within a
-- bound however the leader stops. `term` grows with every new lease: each of the leader's
-- write transactions checks (and share-locks) the row for its own term, so a leader that
-- wakes after its lease passed cannot write anything, and a takeover waits for a
-- transaction that checked a valid lease to end.

create table taskmgr_leader (
    id          boolean primary key default true check (id),
    holder      text not null,
    term        bigint not null check (term >= 1),
    expires_at  timestamptz not null,
    renewed_at  timestamptz not null
);
comment on table taskmgr_leader is 'The managers'' leadership lease: one row; a manager leads while expires_at is ahead.';
comment on column taskmgr_leader.holder is 'The leader''s name, taskmgr-leader-<host>-<pid>.';
comment on column taskmgr_leader.term is 'Grows with each new lease; fences the writes of an earlier leader.';

grant select, insert, update on taskmgr_leader to taskmgr_manager;
grant select on taskmgr_leader to taskmgr_reader;
