"""Database rows (SQLAlchemy 2). The database is the truth; Redis only coordinates.

Every table that holds tenant data carries ``tenant_id`` and every query filters on it.
Instants are stored in UTC (``UTCDateTime`` gives aware datetimes back on every backend).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from syncsvc.store.states import BatchState, Lane, LedgerState, OpState
from syncsvc.store.types import UTCDateTime, utcnow

ID_LEN = 64


#: Named constraints, so later migrations can drop or alter them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime,
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    #: SHA-256 hex of the API key; the key itself is shown once and never stored.
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    callback_url: Mapped[str | None] = mapped_column(Text)
    #: The tenant's own closing days (ISO dates), skipped like public holidays.
    closing_days: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The tenant's Standard Webhooks secret (``whsec_…``), encrypted; made when first needed.
    signing_secret: Mapped[bytes | None] = mapped_column(LargeBinary)
    #: The secret before the last rotation, still signing beside the new one until the time below.
    previous_signing_secret: Mapped[bytes | None] = mapped_column(LargeBinary)
    previous_signing_secret_until: Mapped[datetime | None] = mapped_column()
    #: Origins (``https://crm.example``) a user's connect flow may send the browser back to.
    return_origins: Mapped[list[Any]] = mapped_column(default=list)


class User(Base):
    """A CRM user: an assignee of activities, with at most one calendar connection."""

    __tablename__ = "users"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    email: Mapped[str] = mapped_column(String(320), default="")
    mobile: Mapped[str] = mapped_column(String(64), default="")
    timezone: Mapped[str] = mapped_column(String(64))
    country: Mapped[str | None] = mapped_column(String(8))
    subdivision: Mapped[str | None] = mapped_column(String(16))
    #: Days off sent by the CRM (ISO dates).
    days_off: Mapped[list[Any]] = mapped_column(default=list)
    #: Days off read from the user's calendar (ISO dates), refreshed by the workers.
    provider_days_off: Mapped[list[Any]] = mapped_column(default=list)
    #: ``graph`` | ``google`` | ``caldav`` | ``none``.
    calendar_provider: Mapped[str] = mapped_column(String(16), default="none")
    #: Non-secret connection settings (mailbox, calendar_id, url, username).
    calendar_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: Secret connection settings (password, oauth tokens), encrypted (see store/crypto.py).
    calendar_secret: Mapped[bytes | None] = mapped_column(LargeBinary)
    #: A calendar the user signed in to themselves (their own grant): ``connected`` |
    #: ``reconnect_needed``; ``None`` for connections the tenant set up.
    connection_state: Mapped[str | None] = mapped_column(String(32))
    connection_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Batch(Base):
    """A committed plan: every activity it made records it, so it can be edited and deleted."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    #: The seed's "Created by" value stamped on every activity and external event.
    created_by: Mapped[str] = mapped_column(String(200))
    targetgroup_name: Mapped[str] = mapped_column(String(200), default="")
    #: The plan body as committed (template, schedule, assignment), for edits and audits.
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: ``syncing`` | ``synced`` | ``failed`` | ``deleting`` | ``deleted``.
    state: Mapped[str] = mapped_column(String(16), default=BatchState.SYNCING)
    total: Mapped[int] = mapped_column(Integer, default=0)
    schedule_id: Mapped[str | None] = mapped_column(String(ID_LEN))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


def _call_direction(context: Any) -> str | None:
    return "outgoing" if context.get_current_parameters().get("kind") == "call" else None


#: ``activities``, ``external_events`` and ``operations`` carry no foreign keys (migration
#: 0009): on PostgreSQL each is a per-row trigger, half of a batch commit's COPY. Their rows are
#: written with their parents checked or written in the same transaction, parents (tenants,
#: users, batches) are never deleted, and retention removes children first.


class Activity(Base):
    __tablename__ = "activities"
    __table_args__ = (
        Index("ix_activities_batch_seq", "batch_id", "seq"),
        Index("ix_activities_user_start", "tenant_id", "user_id", "start"),
        #: The tenant's list and export walk these in order, a page at a time.
        Index("ix_activities_tenant_start", "tenant_id", "start", "id"),
        Index("ix_activities_tenant_due", "tenant_id", "due", "id"),
    )

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(ID_LEN))
    batch_id: Mapped[str | None] = mapped_column(String(ID_LEN))
    #: Position in the batch (input target order), for stable listing and CSV export.
    seq: Mapped[int] = mapped_column(Integer, default=0)
    target_id: Mapped[str] = mapped_column(String(200))
    target_ids: Mapped[list[Any]] = mapped_column(default=list)
    user_id: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    start: Mapped[datetime | None] = mapped_column()
    end: Mapped[datetime | None] = mapped_column()
    due: Mapped[date | None] = mapped_column(Date)
    subject: Mapped[str] = mapped_column(Text, default="")
    description: Mapped[str] = mapped_column(Text, default="")
    location: Mapped[str] = mapped_column(Text, default="")
    #: ``planned`` | ``completed`` | ``cancelled`` | ``unanswered``.
    status: Mapped[str] = mapped_column(String(16), default="planned")
    priority: Mapped[str] = mapped_column(String(16), default="normal")
    reminder_minutes: Mapped[int | None] = mapped_column(Integer)
    attendees: Mapped[list[Any]] = mapped_column(default=list)
    fields: Mapped[dict[str, Any]] = mapped_column(default=dict)
    follow_up_of: Mapped[str | None] = mapped_column(String(ID_LEN))
    #: A call's direction (XS Office "Retning"): ``outgoing`` | ``incoming``; ``None`` otherwise.
    #: A call planned by a batch is one the CRM's user places: ``outgoing`` unless given.
    direction: Mapped[str | None] = mapped_column(String(16), default=_call_direction)
    #: The other party's phone number of a call (free text, as the CRM keeps it).
    phone: Mapped[str] = mapped_column(String(64), default="", server_default="")
    #: Set when the assignee changed the event in their own calendar: batch edits then leave
    #: the activity alone unless forced.
    user_edited: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Raised on every change (iCal SEQUENCE, optimistic checks).
    version: Mapped[int] = mapped_column(Integer, default=1)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ExternalEvent(Base):
    """The sync ledger: one row per (activity, external calendar).

    ``state``: ``pending_create`` → ``synced`` → ``pending_update`` / ``pending_delete`` →
    ``deleted``; ``failed`` after the last attempt.
    """

    __tablename__ = "external_events"
    __table_args__ = (
        UniqueConstraint("activity_id", "provider", "calendar"),
        Index("ix_external_events_batch_state", "batch_id", "state"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(ID_LEN))
    activity_id: Mapped[str] = mapped_column(String(ID_LEN))
    batch_id: Mapped[str | None] = mapped_column(String(ID_LEN))
    user_id: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(16))
    #: The mailbox / calendar id / collection URL the event lives in.
    calendar: Mapped[str] = mapped_column(Text)
    #: The provider's id for the event, known once created.
    event_id: Mapped[str | None] = mapped_column(Text)
    etag: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=LedgerState.PENDING_CREATE)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Operation(Base):
    """The outbox: an external operation written in the same transaction as its cause.

    ``kind``: ``create`` | ``update`` | ``delete`` (of a ledger row) | ``callback`` (to the CRM).
    ``lane``: ``interactive`` (a single change) goes before ``bulk`` (batch work) per mailbox.
    ``state``: ``pending`` | ``running`` | ``done`` | ``dead`` (gave up; retry from ops).
    """

    __tablename__ = "operations"
    __table_args__ = (
        Index("ix_operations_due", "state", "mailbox", "lane", "not_before", "id"),
        Index("ix_operations_ledger", "ledger_id"),
        # A mailbox's next due operation in one probe (``queue/due.py`` settles by it).
        Index(
            "ix_operations_open",
            "tenant_id",
            "mailbox",
            "not_before",
            postgresql_where=text("state IN ('pending', 'running')"),
            sqlite_where=text("state IN ('pending', 'running')"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(ID_LEN))
    kind: Mapped[str] = mapped_column(String(16))
    ledger_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    batch_id: Mapped[str | None] = mapped_column(String(ID_LEN))
    #: ``<provider>:<calendar>``: the unit rate limits and fairness are kept per.
    mailbox: Mapped[str] = mapped_column(Text)
    lane: Mapped[str] = mapped_column(String(16), default=Lane.BULK)
    state: Mapped[str] = mapped_column(String(16), default=OpState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class QueueMailbox(Base):
    """When a mailbox may next have due work: what the PostgreSQL dispatcher reads instead of
    grouping the whole outbox (``queue/due.py``). A trigger on ``operations`` lowers
    ``due_at`` and raises ``version`` whenever an operation becomes due earlier; the worker
    raises ``due_at`` after a cycle only if ``version`` is unchanged. So ``due_at`` is never
    later than the mailbox's earliest open operation."""

    __tablename__ = "queue_mailboxes"
    __table_args__ = (
        # Each tenant's due mailboxes in order, and its interactive ones (queue/due.py).
        Index("ix_queue_mailboxes_tenant_due", "tenant_id", "due_at"),
        Index(
            "ix_queue_mailboxes_tenant_interactive",
            "tenant_id",
            "due_at",
            postgresql_where=text("interactive_at IS NOT NULL"),
            sqlite_where=text("interactive_at IS NOT NULL"),
        ),
    )

    tenant_id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    mailbox: Mapped[str] = mapped_column(Text, primary_key=True)
    due_at: Mapped[datetime] = mapped_column()
    #: The earliest open interactive operation, if any.
    interactive_at: Mapped[datetime | None] = mapped_column()
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class IdempotencyKey(Base):
    """The first answer to a POST with an ``Idempotency-Key``, replayed for the same body."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)
    request_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SyncCycle(Base):
    """One pass of a worker over one mailbox: what it did, how long it took."""

    __tablename__ = "sync_cycles"
    __table_args__ = (Index("ix_sync_cycles_started", "started_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    provider: Mapped[str] = mapped_column(String(16))
    mailbox: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    throttled: Mapped[int] = mapped_column(Integer, default=0)


class Feed(Base):
    """A user's secret iCal feed: at most one per user; rotating replaces the token's hash.

    Only the SHA-256 of the token is kept (``hash_token``), so a leaked database row does not
    reveal a working feed URL; the feed is found by that hash.
    """

    __tablename__ = "feeds"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "user_id"], ["users.tenant_id", "users.id"]),
    )

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Schedule(Base):
    """A saved plan that runs on a cron schedule: at each occurrence the service fetches the
    targets from the CRM's ``targets_url`` and commits a batch (Finnish seed, "ajastus")."""

    __tablename__ = "schedules"
    __table_args__ = (
        Index("ix_schedules_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_schedules_next_run", "next_run_at"),
    )

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    #: Five-field cron expression, read in ``timezone`` (wall-clock time, DST-aware).
    cron: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64))
    targets_url: Mapped[str] = mapped_column(Text)
    #: The plan body without ``targets`` (and usually without ``schedule.start_date``).
    plan: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: The next occurrence not yet claimed; a scheduler claims it by moving it on.
    next_run_at: Mapped[datetime] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ScheduleRun(Base):
    """One occurrence of a schedule. Unique per (schedule, occurrence): inserting this row is
    how one scheduler among several claims the occurrence, so it runs exactly once.

    ``state``: ``running`` (``next_attempt_at`` = lease end) → ``ok`` | ``retrying``
    (``next_attempt_at`` = next try) → … → ``failed`` after the last attempt.
    """

    __tablename__ = "schedule_runs"
    __table_args__ = (
        UniqueConstraint("schedule_id", "occurrence"),
        Index("ix_schedule_runs_due", "state", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    schedule_id: Mapped[str] = mapped_column(ForeignKey("schedules.id"))
    occurrence: Mapped[datetime] = mapped_column()
    state: Mapped[str] = mapped_column(String(16), default="running")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    batch_id: Mapped[str | None] = mapped_column(String(ID_LEN))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


#: A feed's ETag reads the newest change among one user's activities; with this index that is
#: an index lookup instead of a scan of all of them (5,000 rows: ~3 ms per conditional GET).
Index("ix_activities_user_updated", Activity.tenant_id, Activity.user_id, Activity.updated_at)


class Subscription(Base):
    """A provider's promise to tell us when a calendar changes: a Graph change-notification
    subscription or a Google push channel, with the incremental-sync token read after it.

    ``client_state`` is the secret the provider echoes in every notification (Graph
    ``clientState``, Google channel token). Graph subscriptions keep only its SHA-256 hex
    (``hash_token``): Graph never needs it back, and a leaked row then forges nothing.
    Compare in constant time (``hmac.compare_digest``).
    """

    __tablename__ = "subscriptions"
    __table_args__ = (
        UniqueConstraint("provider", "external_id"),
        Index("ix_subscriptions_tenant_user", "tenant_id", "provider", "user_id"),
        Index("ix_subscriptions_expires", "provider", "expires_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    provider: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    user_id: Mapped[str] = mapped_column(String(200))
    #: As in ``ExternalEvent.calendar``: the mailbox / calendar id the subscription watches.
    calendar: Mapped[str] = mapped_column(Text)
    #: The provider's id: Graph subscription id, Google channel id.
    external_id: Mapped[str] = mapped_column(String(255))
    client_state: Mapped[str] = mapped_column(String(128))
    #: Graph: the watched resource (``/users/{m}/events``); Google: the channel's resourceId.
    resource_id: Mapped[str | None] = mapped_column(Text)
    #: Graph ``@odata.deltaLink`` / Google ``nextSyncToken``; ``None`` means a full sync next.
    sync_token: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


#: A user's own calendar change is matched to our ledger by the provider's event id.
Index("ix_external_events_event", ExternalEvent.provider, ExternalEvent.event_id)


class MailboxOwner(Base):
    """A Graph mailbox or Google calendar belongs to at most one tenant: the first to register
    it claims it here (the primary key makes two claims at once collide)."""

    __tablename__ = "mailbox_owners"

    provider: Mapped[str] = mapped_column(String(16), primary_key=True)
    #: Lower-cased mailbox address / calendar id.
    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TenantDomain(Base):
    """A domain a tenant's connection covers (``syncsvc tenants domains add``): once a tenant
    has any for a provider, its mailboxes there must be in one of them."""

    __tablename__ = "tenant_domains"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    provider: Mapped[str] = mapped_column(String(16), primary_key=True)
    domain: Mapped[str] = mapped_column(String(255), primary_key=True)


class TenantConnection(Base):
    """A tenant's organisation-wide connection to a provider: for Graph, the Entra tenant
    (``directory``) whose admin consented to our multi-tenant app, and its verified domains;
    for Google, its Workspace domains and optionally its own service account.

    ``state``: see ``ConnectionState`` (``service/tenant_connections.py``).
    """

    __tablename__ = "tenant_connections"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    provider: Mapped[str] = mapped_column(String(16), primary_key=True)
    state: Mapped[str] = mapped_column(String(32))
    #: The Entra tenant id; one directory serves at most one syncsvc tenant.
    directory: Mapped[str | None] = mapped_column(String(64), unique=True)
    domains: Mapped[list[Any]] = mapped_column(default=list)
    #: Google: the tenant's own service-account key (JSON), encrypted; ``None``: the install's.
    secret: Mapped[bytes | None] = mapped_column(LargeBinary)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class OAuthState(Base):
    """One consent flow in flight: the ``state`` the provider hands back (stored hashed),
    bound to one tenant and purpose, used once, before it expires."""

    __tablename__ = "oauth_states"

    #: SHA-256 hex of the state value.
    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    purpose: Mapped[str] = mapped_column(String(32))
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column()
    #: What the flow needs back at its end (e.g. the user id and return URL of a user connect).
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
