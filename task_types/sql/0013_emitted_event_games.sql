-- The sports columns of the engine's event history (sql/0012): which game and provider an
-- event is about, taken from its data (every game event carries provider and game_id,
-- task_types.sports.game_ref), so `taskmgr games show` and `events list --game` read an
-- index instead of every event's JSON. The engine itself knows no games.

alter table emitted_events
    add column provider text generated always as (data ->> 'provider') stored;
alter table emitted_events
    add column game_key text generated always as ((data ->> 'provider') || ':' || (data ->> 'game_id')) stored;
comment on column emitted_events.provider is 'From data.provider: nba, espn, mlb, nhl (null for events about no game).';
comment on column emitted_events.game_key is '<provider>:<game_id>, from the data (null for events about no game).';
create index emitted_events_game_idx on emitted_events (game_key, time) where game_key is not null;
