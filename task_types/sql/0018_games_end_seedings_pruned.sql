-- 1. A game's live poller ends 8 hours after its first start at the latest (the engine's
--    max_runtime_s, sql/0017): a game its provider leaves "live" by mistake is not polled
--    for ever. The longest games (extra innings, multiple overtimes, rain delays) end
--    well within it. Operators change it with `taskmgr types update live_game --max-runtime S`.
-- 2. A seeding row names its schedule task: when retention prunes that task's tree (every
--    task in it ended and older than the retention, sql/0017), the seeding goes with it.
--    Seedings only matter for the day of the cron's latest fire time, never for days that
--    old, so the table stays as small as the tasks.

update task_types set max_runtime_s = 8 * 3600 where name = 'live_game' and max_runtime_s is null;

alter table schedule_seedings drop constraint schedule_seedings_task_id_fkey;
alter table schedule_seedings add constraint schedule_seedings_task_id_fkey
    foreign key (task_id) references tasks (id) on delete cascade;
