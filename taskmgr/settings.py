"""Settings from the environment (prefix TASKMGR_), with defaults that work on a
developer machine with PostgreSQL and RabbitMQ on localhost."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/taskmgr"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TASKMGR_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    amqp_url: str = DEFAULT_AMQP_URL
    # Prefix of every exchange and queue name; tests give each run its own.
    amqp_prefix: str = "taskmgr"

    # Manager: discovery and dispatch.
    poll_interval: float = Field(1.0, gt=0, description="seconds between discovery polls")
    dispatch_batch: int = Field(5000, ge=1, description="tasks claimed per statement")
    dispatch_first_batch: int = Field(
        500, ge=1, description="tasks claimed by a poll's first statement (each next one doubles)"
    )
    orders_per_message: int = Field(200, ge=1, description="start orders packed per AMQP message")
    lateness_alert: float = Field(10.0, gt=0, description="seconds late before a warning")
    # Manager: recovery.
    recovery_interval: float = Field(2.0, gt=0, description="seconds between recovery runs")
    runner_dead_after: float = Field(15.0, gt=0, description="seconds without heartbeat")
    retention_days: int = Field(
        30, ge=1, description="days of task history kept; whole trees of tasks ended before are pruned"
    )
    runner_retention_days: int = Field(7, ge=1, description="days a stopped or dead runner's row is kept")
    leader_retry: float = Field(1.0, gt=0, description="seconds between leadership attempts")
    leader_lease: float = Field(
        10.0, gt=0, description="seconds a leadership lease lasts unless renewed (the hand-over bound)"
    )
    # Who may send what on the progress queue: RabbitMQ users (the messages' validated
    # user_id), comma-separated. guest can only connect from localhost (RabbitMQ's
    # loopback_users), so allowing it serves development and tests only.
    runner_users: str = "taskmgr_runner,guest"
    service_users: str = "taskmgr_service,guest"

    # Runner.
    pool: str = "default"
    concurrency: int = Field(10000, ge=1, description="pollers per runner process")
    heartbeat_interval: float = Field(3.0, gt=0)
    prefetch_messages: int = Field(8, ge=1)
    host_concurrency: int = Field(64, ge=1, description="concurrent requests per API host")
    host_rate: float = Field(0.0, ge=0, description="requests/s per API host (0: no limit)")
    host_limits: str = ""  # "host=concurrency:rate,..." overrides per host
    # Hosts a runner may call besides the providers' (their base URLs): host, host:port
    # or *.domain, comma-separated.
    allowed_hosts: str = ""
    max_response_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="bytes of an API response body read at most (decompressed)"
    )

    # Events: the history (the recorder's hypertable) and the replayable stream.
    event_retention_days: int = Field(30, ge=1, description="days of emitted events kept in the history")
    events_stream_max_age: str = Field(
        "7D",
        pattern=r"^[1-9][0-9]*[YMDhms]$",
        description="how long the events stream keeps events (RabbitMQ x-max-age: 7D, 12h, ...)",
    )
    events_stream_max_bytes: int = Field(
        10 * 1024**3, ge=1024**2, description="bytes the events stream keeps at most (x-max-length-bytes)"
    )
    recorder_batch: int = Field(5000, ge=1, description="events stored per transaction by the recorder")

    # Observability.
    log_level: str = "INFO"
    log_format: str = "text"  # or json
    metrics_port: int = 0  # 0: no metrics endpoint

    def senders(self) -> dict[str, frozenset[str]]:
        """The RabbitMQ users allowed to send each kind of progress message."""

        def names(value: str) -> frozenset[str]:
            return frozenset(n.strip() for n in value.split(",") if n.strip())

        runners = names(self.runner_users)
        return {"reports": runners, "heartbeat": runners, "service": names(self.service_users)}
