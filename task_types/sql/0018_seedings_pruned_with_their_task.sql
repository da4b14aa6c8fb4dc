-- A seeding row names its schedule task: when retention prunes that task's tree (every
-- task in it ended and older than the retention, sql/0017), the seeding goes with it.
-- Seedings only matter for the day of the cron's latest fire time, never for days that
-- old, so the table stays as small as the tasks.

alter table schedule_seedings drop constraint schedule_seedings_task_id_fkey;
alter table schedule_seedings add constraint schedule_seedings_task_id_fkey
    foreign key (task_id) references tasks (id) on delete cascade;
