-- Each day's schedule seeding, once per (provider, league, day), recorded in the same
-- transaction as its schedule task: a leader that takes over seeds a day nobody seeded
-- at the cron's moment (a leadership change, a database blip, a late loop), and a
-- repeat seeds nothing twice.

create table schedule_seedings (
    provider    text not null,
    league      text not null,
    day         date not null,
    task_id     uuid not null references tasks (id),
    seeded_at   timestamptz not null default now(),
    primary key (provider, league, day)
);
comment on table schedule_seedings is 'The daily schedule job''s seedings: one per provider, league and day.';

grant select, insert on schedule_seedings to taskmgr_manager;
grant select on schedule_seedings to taskmgr_reader;
