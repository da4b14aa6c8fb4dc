"""Settings from the environment (prefix TASKMGR_), with defaults that work on a
developer machine with PostgreSQL and RabbitMQ on localhost."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/taskmgr"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TASKMGR_", extra="ignore")

    # One PostgreSQL server, or a primary and its replicas for failover: several hosts,
    # comma-separated, with target_session_attrs=read-write (the primary, wherever it
    # runs now): postgresql+asyncpg://u@h1:5432,h2:5432/db?target_session_attrs=read-write
    database_url: str = DEFAULT_DATABASE_URL
    # Read-only commands (tasks list, show, stats, the API's reads) may use a replica:
    # target_session_attrs=prefer-standby. Empty: database_url.
    read_database_url: str = ""
    # One RabbitMQ node, or the nodes of a cluster, comma-separated: each connection
    # starts at one of them and moves to the next when its node goes away.
    amqp_url: str = DEFAULT_AMQP_URL
    # Prefix of every exchange and queue name; tests give each run its own.
    amqp_prefix: str = "taskmgr"
    # Quorum queues (replicated) for the start, progress, control, dead and recorder
    # queues. Unset: on when amqp_url lists several nodes (a cluster), off for one.
    quorum_queues: bool | None = None
    delivery_limit: int = Field(
        10, ge=1, description="deliveries of a message without an ack before a quorum queue dead-letters it"
    )

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

    # The HTTP API and console (`taskmgr api`).
    api_host: str = Field("127.0.0.1", description="address the API listens on")
    api_port: int = Field(8080, ge=0, le=65535, description="port the API listens on")
    api_token_cache_s: float = Field(
        5.0, ge=0, description="seconds a checked token is trusted before it is looked up again"
    )
    api_stream_poll_s: float = Field(
        0.25, gt=0, description="seconds between the live stream's reads of the event history"
    )
    api_stream_lookback_s: float = Field(
        3.0, ge=0, description="seconds behind its newest event the live stream reads again (late commits)"
    )
    api_secure_cookie: bool = Field(False, description="mark the console's cookie Secure (behind HTTPS)")

    # Observability.
    log_level: str = "INFO"
    log_format: str = "text"  # or json
    metrics_port: int = 0  # 0: no metrics endpoint

    @property
    def use_quorum_queues(self) -> bool:
        if self.quorum_queues is not None:
            return self.quorum_queues
        return len([u for u in self.amqp_url.split(",") if u.strip()]) > 1

    @property
    def reads_url(self) -> str:
        """The database URL of read-only commands."""
        return self.read_database_url or self.database_url

    def senders(self) -> dict[str, frozenset[str]]:
        """The RabbitMQ users allowed to send each kind of progress message."""

        def names(value: str) -> frozenset[str]:
            return frozenset(n.strip() for n in value.split(",") if n.strip())

        runners = names(self.runner_users)
        return {"reports": runners, "heartbeat": runners, "service": names(self.service_users)}
