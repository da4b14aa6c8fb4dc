-- The built-in sports task types. Operators change intervals, URLs or pools with
-- `taskmgr types update` (or SQL); runners take the new values at the next dispatch.
-- `{base}` is the provider's base URL (the simulated feed unless TASKMGR_PROVIDER_URLS
-- names the real API); the handlers fill `{game_path}` / `{schedule_path}` per provider.

insert into task_types (name, handler, url_template, poll_interval_s, payload_schema,
    max_attempts, backoff_base_s, backoff_max_s, request_timeout_s, start_timeout_s,
    max_consecutive_failures, pool, misfire_policy, misfire_grace_s)
values
('schedule', 'schedule', '{base}{schedule_path}', 5, '{
    "type": "object",
    "properties": {
        "provider": {"enum": ["nba", "espn", "mlb", "nhl"]},
        "league": {"type": "string", "minLength": 1},
        "date": {"type": "string", "format": "date"},
        "lead_s": {"type": "number", "minimum": 0},
        "game_type": {"type": "string"}
    },
    "required": ["provider", "league", "date"],
    "additionalProperties": false
}', 5, 5, 300, 10, 30, 3, 'default', 'coalesce', 3600),
('live_game', 'live_game', '{base}{game_path}', 3, '{
    "type": "object",
    "properties": {
        "provider": {"enum": ["nba", "espn", "mlb", "nhl"]},
        "league": {"type": "string", "minLength": 1},
        "game_id": {"type": "string", "minLength": 1},
        "stat_correction_delay_s": {"type": "number", "minimum": 0}
    },
    "required": ["provider", "league", "game_id"],
    "additionalProperties": false
}', 5, 2, 60, 5, 30, 10, 'default', 'coalesce', 600),
('period_score', 'period_score', '{base}{game_path}', 5, '{
    "type": "object",
    "properties": {
        "provider": {"enum": ["nba", "espn", "mlb", "nhl"]},
        "league": {"type": "string"},
        "game_id": {"type": "string"},
        "period": {"type": "integer", "minimum": 1}
    },
    "required": ["provider", "league", "game_id", "period"]
}', 5, 2, 60, 5, 30, 5, 'default', 'coalesce', 600),
('stat_correction', 'stat_correction', '{base}{game_path}', 5, '{
    "type": "object",
    "properties": {
        "provider": {"enum": ["nba", "espn", "mlb", "nhl"]},
        "league": {"type": "string"},
        "game_id": {"type": "string"}
    },
    "required": ["provider", "league", "game_id"]
}', 5, 2, 60, 5, 30, 5, 'default', 'coalesce', 3600)
on conflict (name) do nothing;
