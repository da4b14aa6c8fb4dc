-- seeded --
-- Which (provider, league) pairs have their day seeded already.
select provider, league from schedule_seedings where day = :day;

-- record_seedings --
insert into schedule_seedings (provider, league, day, task_id, seeded_at)
select u.provider, u.league, :day, u.task_id, :now
from unnest(cast(:providers as text[]), cast(:leagues as text[]), cast(:task_ids as uuid[]))
    as u(provider, league, task_id)
on conflict (provider, league, day) do nothing;
