"""The sports part's settings, from the environment like the engine's (prefix TASKMGR_):
which APIs the handlers call, which leagues the daily schedule seeds, and when."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from task_types.providers import PROVIDERS

DEFAULT_FEED_URL = "http://127.0.0.1:8765"


class SportsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TASKMGR_", extra="ignore")

    # The daily schedule job. An empty cron: no daily job (a harness or an operator seeds
    # days with `taskmgr schedule seed`).
    schedule_cron: str = "0 6 * * *"
    schedule_timezone: str = "America/New_York"
    schedule_lead_s: float = 300.0  # a game's task is due this long before its start
    leagues: str = "nba:nba,espn:basketball/nba,mlb:mlb,nhl:nhl"  # provider:league pairs

    # Providers: base URL per provider. Those not named in provider_urls: the simulated
    # feed at feed_url.
    feed_url: str = DEFAULT_FEED_URL
    provider_urls: str = ""  # "nba=https://cdn.nba.com,espn=https://site.api.espn.com,..."

    def base_urls(self) -> dict[str, str]:
        """Base URL per provider: the configured real API, or the simulated feed."""
        urls = {p: f"{self.feed_url.rstrip('/')}/{p}" for p in PROVIDERS}
        for item in filter(None, (s.strip() for s in self.provider_urls.split(","))):
            name, _, url = item.partition("=")
            urls[name.strip()] = url.strip().rstrip("/")
        return urls

    def league_list(self) -> list[tuple[str, str]]:
        pairs = []
        for item in filter(None, (s.strip() for s in self.leagues.split(","))):
            provider, _, league = item.partition(":")
            pairs.append((provider.strip(), (league or provider).strip()))
        return pairs
