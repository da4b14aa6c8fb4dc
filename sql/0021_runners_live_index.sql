-- The runners that may still be alive: neither stopped nor declared dead. `runners` keeps a
-- row for every runner process ever seen; recovery (dead_runners, every
-- TASKMGR_RECOVERY_INTERVAL) and the leader's live-runners gauge (live_runners_by_pool,
-- every 15 s) look only at these, so with this index they read what lives, not the table.
create index runners_live_idx on runners (pool, last_seen) where not dead and stopped_at is null;
