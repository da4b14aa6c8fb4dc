-- Named queries over the event history for games (the game_key column of
-- task_types/sql/0013), loaded by task_types/games.py.

-- game_keys --
-- Which of these keys the history holds (a game id given without its provider).
select distinct game_key from emitted_events where game_key = any(cast(:keys as text[]));

-- game_events --
select time, event_id, kind, task_type, task_id, root_task_id, runner_id, attempt, version, data
from emitted_events
where game_key = :key and time >= :since
  and (cardinality(cast(:kinds as text[])) = 0 or kind = any(cast(:kinds as text[])))
order by time, event_id
limit :limit;

-- game_minutes --
-- Events per minute of the game (TimescaleDB time_bucket), and score changes among them.
select time_bucket(interval '1 minute', time) as minute,
       count(*) as events,
       count(*) filter (where kind = 'score.changed') as score_changes
from emitted_events
where game_key = :key
group by minute
order by minute;

-- games_events --
-- The game events of several game tasks (a day's board), in time order.
select time, event_id, kind, task_type, task_id, root_task_id, runner_id, attempt, version, data
from emitted_events
where task_id = any(cast(:task_ids as uuid[])) and time >= :since
order by time, event_id;
