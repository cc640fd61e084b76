"""Settings from ``SYNCSVC_*`` environment variables, read once at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from syncsvc.errors import ErrorDetail, ValidationError
from syncsvc.limits import (
    APP_CONCURRENCY,
    CALDAV_LIMIT,
    GOOGLE_LIMIT,
    GRAPH_APP_LIMIT,
    GRAPH_LIMIT,
    Quota,
    RateLimit,
)
from syncsvc.providers.egress import EgressPolicy

PREFIX = "SYNCSVC_"
SECRET_KEY_MIN_CHARS = 32
DEFAULT_DATA_DIR = Path("var")
#: A dev key for the embedded default only; ``serve`` warns when it is used.
DEV_SECRET_KEY = "dev-only-secret-key-change-me-in-production!"
#: The ``retain_*_days`` settings (``SYNCSVC_RETAIN_*_DAYS``).
RETENTION_DAYS = (
    "retain_done_operations_days",
    "retain_cycles_days",
    "retain_schedule_runs_days",
    "retain_deleted_activities_days",
)


class ConfigError(ValidationError):
    code = "config_error"


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = f"sqlite:///{DEFAULT_DATA_DIR / 'syncsvc.db'}"
    redis_url: str | None = None
    public_base_url: str = "http://127.0.0.1:8080"
    secret_key: str = DEV_SECRET_KEY
    #: The key before a rotation: still decrypts until ``syncsvc rotate-keys`` has run.
    secret_key_previous: str | None = None
    operator_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    #: Largest request body accepted (bytes); larger → 413.
    max_body_bytes: int = 10 * 1024 * 1024
    #: Per tenant: API requests per window, and heavy requests (plans, commits) at once.
    api_rate: tuple[int, int] = (600, 60)
    api_heavy_concurrency: int = 2
    #: Child processes parsing large plan bodies (``api/bodies.py``) per API process.
    api_parse_processes: int = 2
    #: ``text`` (one readable line per record) or ``json`` (one JSON object per line).
    log_format: str = "text"
    #: The largest lists one plan may carry (``POST /v1/plans`` and ``/v1/batches``).
    max_targets: int = 100_000
    max_contacts: int = 200  # per target
    max_plan_users: int = 1_000
    max_exclude: int = 100_000
    #: A batch with more activities than this answers 202 ``committing`` and is written in
    #: the background (``GET /v1/batches/{id}`` shows progress); smaller ones answer 201.
    commit_async_activities: int = 20_000
    graph_api_url: str = "https://graph.microsoft.com/v1.0"
    graph_authority_url: str = "https://login.microsoftonline.com"
    graph_client_id: str | None = None
    graph_client_secret: str | None = None
    graph_tenant_id: str | None = None
    #: Lifetime asked for a Graph change-notification subscription (Outlook's maximum: 10,080).
    graph_subscription_minutes: int = 10_080
    #: Each CalDAV calendar is polled for the user's changes this often (minutes, at most a day).
    caldav_poll_minutes: int = 5
    #: Whole days before and after today an iCal feed shows.
    feed_days_back: int = 90
    feed_days_ahead: int = 548
    #: Schedule runs at once in one scheduler process, and of those at most this many per tenant.
    scheduler_concurrency: int = 16
    scheduler_tenant_concurrency: int = 2
    #: A schedule's cron may fire at most this often (at most a day).
    schedule_min_interval_minutes: int = 15
    #: Whole days history is kept before the workers prune it (0: kept for ever): finished
    #: operations, sync cycles, finished schedule runs, and deleted activities with their
    #: deleted ledger rows (at least 31 days, so the iCal feed can show them as cancelled).
    retain_done_operations_days: int = 7
    retain_cycles_days: int = 7
    retain_schedule_runs_days: int = 30
    retain_deleted_activities_days: int = 31
    google_api_url: str = "https://www.googleapis.com/calendar/v3/"
    google_token_url: str = "https://oauth2.googleapis.com/token"
    google_service_account_file: str | None = None
    #: The install's OAuth web client, for users who connect their own Google calendar.
    google_auth_url: str = "https://accounts.google.com/o/oauth2/v2/auth"
    google_client_id: str | None = None
    google_client_secret: str | None = None
    #: Per-mailbox limits by provider (providers.md's published figures by default).
    limits: Mapping[str, RateLimit] = field(
        default_factory=lambda: {
            "graph": GRAPH_LIMIT,
            "google": GOOGLE_LIMIT,
            "caldav": CALDAV_LIMIT,
        }
    )
    #: Per-app limits by provider, over every mailbox of every tenant (Graph's by default;
    #: ``SYNCSVC_<PROVIDER>_APP_RATE`` sets one for any provider, e.g. a Google project quota).
    app_limits: Mapping[str, RateLimit] = field(default_factory=lambda: {"graph": GRAPH_APP_LIMIT})
    #: Where tenant-supplied URLs may lead beyond the public internet (``SYNCSVC_EGRESS_ALLOW``).
    egress: EgressPolicy = field(default_factory=lambda: EgressPolicy.from_env(os.environ))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Reads ``SYNCSVC_*``; rate limits as ``SYNCSVC_<PROVIDER>_RATE=requests/seconds``,
        ``SYNCSVC_<PROVIDER>_CONCURRENCY=n`` (per mailbox) and ``SYNCSVC_<PROVIDER>_APP_RATE``
        (per app)."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(PREFIX + name)
            return value if value not in (None, "") else None

        errors: list[ErrorDetail] = []
        kwargs: dict[str, object] = {}
        for name in (
            "database_url",
            "redis_url",
            "public_base_url",
            "log_format",
            "secret_key",
            "secret_key_previous",
            "operator_key",
            "host",
            "graph_api_url",
            "graph_authority_url",
            "graph_client_id",
            "graph_client_secret",
            "graph_tenant_id",
            "google_api_url",
            "google_token_url",
            "google_service_account_file",
            "google_auth_url",
            "google_client_id",
            "google_client_secret",
        ):
            value = get(name.upper())
            if value is not None:
                kwargs[name] = value
        for name in (
            "port",
            "max_body_bytes",
            "api_heavy_concurrency",
            "api_parse_processes",
            "max_targets",
            "commit_async_activities",
            "max_contacts",
            "max_plan_users",
            "max_exclude",
            "graph_subscription_minutes",
            "caldav_poll_minutes",
            "feed_days_back",
            "feed_days_ahead",
            "scheduler_concurrency",
            "scheduler_tenant_concurrency",
            "schedule_min_interval_minutes",
            *RETENTION_DAYS,
        ):
            raw = get(name.upper())
            if raw is not None:
                try:
                    kwargs[name] = int(raw)
                except ValueError:
                    errors.append(ErrorDetail((PREFIX + name.upper(),), "must be an integer"))
        if kwargs.get("log_format", "text") not in ("text", "json"):
            errors.append(ErrorDetail((PREFIX + "LOG_FORMAT",), "must be text or json"))
        for key_name in ("secret_key", "secret_key_previous", "operator_key"):
            key = kwargs.get(key_name)
            if isinstance(key, str) and len(key) < SECRET_KEY_MIN_CHARS:
                errors.append(
                    ErrorDetail(
                        (PREFIX + key_name.upper(),),
                        f"must be at least {SECRET_KEY_MIN_CHARS} characters",
                    )
                )
        for name, most in (
            ("api_parse_processes", 64),
            ("scheduler_concurrency", None),
            ("scheduler_tenant_concurrency", None),
            ("schedule_min_interval_minutes", 24 * 60),
            ("caldav_poll_minutes", 24 * 60),
        ):
            number = kwargs.get(name)
            if isinstance(number, int) and (number < 1 or (most is not None and number > most)):
                bound = f" and at most {most}" if most else ""
                errors.append(ErrorDetail((PREFIX + name.upper(),), f"must be at least 1{bound}"))
        for name in RETENTION_DAYS:
            number = kwargs.get(name)
            if isinstance(number, int) and number < 0:
                errors.append(ErrorDetail((PREFIX + name.upper(),), "must be 0 (keep) or more"))
        api_rate = get("API_RATE")
        if api_rate is not None:
            left, _, right = api_rate.partition("/")
            try:
                requests, window_s = int(left), int(right or "1")
                if requests < 1 or window_s < 1:
                    raise ValueError(api_rate)
                kwargs["api_rate"] = (requests, window_s)
            except ValueError:
                errors.append(
                    ErrorDetail((PREFIX + "API_RATE",), "must look like 600/60 (requests/seconds)")
                )
        limits = dict(cls().limits)
        for provider, current in limits.items():
            rate = get(f"{provider.upper()}_RATE")
            conc = get(f"{provider.upper()}_CONCURRENCY")
            try:
                requests, per_s = current.requests, current.per_s
                if rate is not None:
                    left, _, right = rate.partition("/")
                    requests, per_s = int(left), float(right or "1")
                concurrency = int(conc) if conc is not None else current.concurrency
                if requests < 1 or per_s <= 0 or concurrency < 1:
                    raise ValueError(rate)
                limits[provider] = RateLimit(requests, per_s, concurrency)
            except ValueError:
                errors.append(
                    ErrorDetail(
                        (f"{PREFIX}{provider.upper()}_RATE",),
                        "must look like 600/60 (requests/seconds) with a positive concurrency",
                    )
                )
        app_limits = dict(cls().app_limits)
        for provider in limits:
            rate = get(f"{provider.upper()}_APP_RATE")
            if rate is None:
                continue
            try:
                left, _, right = rate.partition("/")
                app_limits[provider] = RateLimit(int(left), float(right or "1"), APP_CONCURRENCY)
            except ValueError:
                errors.append(
                    ErrorDetail(
                        (f"{PREFIX}{provider.upper()}_APP_RATE",),
                        "must look like 130000/10 (requests/seconds)",
                    )
                )
        try:
            kwargs["egress"] = EgressPolicy.from_env(env)
        except ValueError as exc:
            errors.append(ErrorDetail((PREFIX + "EGRESS_ALLOW",), str(exc)))
        if errors:
            raise ConfigError("invalid configuration", errors)
        kwargs["limits"] = limits
        kwargs["app_limits"] = app_limits
        return cls(**kwargs)  # type: ignore[arg-type]

    @property
    def api_quota(self) -> Quota:
        return Quota(*self.api_rate, heavy=self.api_heavy_concurrency)

    @property
    def uses_dev_secret(self) -> bool:
        return self.secret_key == DEV_SECRET_KEY
