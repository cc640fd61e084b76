"""A tenant's organisation-wide provider connection: Microsoft 365 through admin consent.

The install keeps one multi-tenant Entra app (``SYNCSVC_GRAPH_CLIENT_ID``/``_SECRET``); each
tenant's administrator consents to it in their own Entra tenant (the *directory*). ``start``
makes a single-use ``state`` bound to the tenant and answers Microsoft's admin-consent URL;
Microsoft sends the administrator back to ``GET /oauth/graph/admin-consent``, where ``finish``
records the directory and its verified domains (``GET /organization``). From then on app
tokens for the tenant's mailboxes are taken in that directory only, and only mailboxes in
those domains can be registered (``service/mailboxes.py``).

Google Workspace has no consent redirect for domain-wide delegation: the tenant names its
domains (``put_google``), optionally with its own service-account key (stored encrypted); its
calendars must be in those domains and are reached with that key, else the install's.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from syncsvc.changes.apply import enqueue_callback
from syncsvc.config import Settings
from syncsvc.errors import (
    BadRequest,
    Conflict,
    ErrorDetail,
    Forbidden,
    Permanent,
    ProviderError,
    ValidationError,
)
from syncsvc.providers.google import check_service_account_info
from syncsvc.queue.outbox import CallbackTask
from syncsvc.service.mailboxes import normalized_domain
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import OAuthState, Operation, Tenant, TenantConnection, TenantDomain
from syncsvc.store.states import OpState
from syncsvc.store.types import utcnow

#: How long a consent link stays usable.
STATE_TTL = timedelta(minutes=15)
ADMIN_CONSENT = "graph_admin_consent"
ADMIN_CONSENT_PATH = "/oauth/graph/admin-consent"
GRAPH_DEFAULT_SCOPE = "https://graph.microsoft.com/.default"
_DIRECTORY_ID = re.compile(r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")

#: Reads a directory's verified domains with an app token of that directory.
DomainReader = Callable[[str], Awaitable[list[str]]]


class ConnectionState(StrEnum):
    PENDING = "pending"  # a consent link is out, nothing granted yet
    CONNECTED = "connected"
    REFUSED = "refused"  # the administrator cancelled, or the grant could not be used
    RECONNECT_NEEDED = "reconnect_needed"  # granted once, no longer accepted


@dataclass(frozen=True, slots=True)
class ConnectionView:
    provider: str
    state: ConnectionState
    directory: str | None
    domains: list[str]
    #: Google: the tenant's own service account (its ``client_email``), if it gave a key.
    service_account: str | None
    error: str | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class TenantLinks:
    """What the provider registry needs of a tenant's connections (secrets decrypted)."""

    directory: str | None = None
    google_key: dict[str, object] | None = None


@dataclass(frozen=True, slots=True)
class ConsentOutcome:
    """What the administrator's browser is shown at the end of the flow."""

    tenant_name: str
    state: ConnectionState
    message: str


def state_hash(state: str) -> str:
    """States are stored hashed: a database read gives no live consent link away."""
    return hashlib.sha256(state.encode()).hexdigest()


def _view(row: TenantConnection, box: SecretBox) -> ConnectionView:
    account = box.decrypt(row.secret).get("client_email") if row.secret else None
    return ConnectionView(
        provider=row.provider,
        state=ConnectionState(row.state),
        directory=row.directory,
        domains=list(row.domains),
        service_account=str(account) if account else None,
        error=row.error,
        updated_at=row.updated_at,
    )


async def list_connections(
    session: AsyncSession, box: SecretBox, tenant_id: str
) -> list[ConnectionView]:
    rows = await session.scalars(
        select(TenantConnection)
        .where(TenantConnection.tenant_id == tenant_id)
        .order_by(TenantConnection.provider)
    )
    return [_view(row, box) for row in rows]


async def put_google(
    session: AsyncSession,
    box: SecretBox,
    tenant_id: str,
    domains: list[str],
    service_account: dict[str, object] | None,
) -> ConnectionView:
    """Sets the tenant's Workspace domains (a domain serves one tenant: 409) and its own
    service-account key, or none (the install's account)."""
    names = sorted({normalized_domain(d, ("body", "domains", n)) for n, d in enumerate(domains)})
    if service_account is not None:
        try:
            check_service_account_info(service_account)
        except Permanent as exc:
            raise ValidationError(
                str(exc), [ErrorDetail(("body", "service_account"), "a service-account key")]
            ) from exc
    taken = await session.scalar(
        select(TenantDomain.domain).where(
            TenantDomain.provider == "google",
            TenantDomain.domain.in_(names),
            TenantDomain.tenant_id != tenant_id,
        )
    )
    if taken is not None:
        raise Conflict(
            f"the Google Workspace domain {taken} is connected to another tenant",
            [ErrorDetail(("body", "domains"), taken)],
        )
    row = await session.get(TenantConnection, (tenant_id, "google"))
    if row is None:
        row = TenantConnection(tenant_id=tenant_id, provider="google")
        session.add(row)
    row.state, row.domains, row.error = ConnectionState.CONNECTED, names, None
    row.secret = box.encrypt(service_account) if service_account is not None else None
    await _replace_domains(session, tenant_id, "google", names)
    await session.flush()
    return _view(row, box)


async def _replace_domains(
    session: AsyncSession, tenant_id: str, provider: str, domains: list[str]
) -> None:
    await session.execute(
        delete(TenantDomain).where(
            TenantDomain.tenant_id == tenant_id, TenantDomain.provider == provider
        )
    )
    session.add_all(TenantDomain(tenant_id=tenant_id, provider=provider, domain=d) for d in domains)


async def start_graph_consent(
    session: AsyncSession, settings: Settings, tenant_id: str
) -> tuple[str, str]:
    """A fresh admin-consent link and its ``state``; a connected tenant stays connected until
    the new consent arrives."""
    row = await session.get(TenantConnection, (tenant_id, "graph"))
    if not (settings.graph_client_id and settings.graph_client_secret):
        raise ValidationError("Microsoft Graph is not configured on this install")
    state = secrets.token_urlsafe(32)
    session.add(
        OAuthState(
            state_hash=state_hash(state),
            tenant_id=tenant_id,
            purpose=ADMIN_CONSENT,
            expires_at=utcnow() + STATE_TTL,
        )
    )
    if row is None:
        session.add(
            TenantConnection(tenant_id=tenant_id, provider="graph", state=ConnectionState.PENDING)
        )
    elif row.state != ConnectionState.CONNECTED:
        row.state, row.error = ConnectionState.PENDING, None
    query = urlencode(
        {
            "client_id": settings.graph_client_id,
            "scope": GRAPH_DEFAULT_SCOPE,
            "redirect_uri": settings.public_base_url.rstrip("/") + ADMIN_CONSENT_PATH,
            "state": state,
        }
    )
    authority = settings.graph_authority_url.rstrip("/")
    return f"{authority}/organizations/v2.0/adminconsent?{query}", state


async def take_state(session: AsyncSession, state: str, purpose: str) -> tuple[str, dict[str, Any]]:
    """The tenant a ``state`` was made for and what its flow kept; it is used up here,
    whatever follows."""
    now = utcnow()
    found = await session.execute(
        update(OAuthState)
        .where(
            OAuthState.state_hash == state_hash(state),
            OAuthState.purpose == purpose,
            OAuthState.used_at.is_(None),
            OAuthState.expires_at > now,
        )
        .values(used_at=now)
        .returning(OAuthState.tenant_id, OAuthState.payload)
        .execution_options(synchronize_session=False)
    )
    row = found.first()
    if row is None:
        raise Forbidden(
            "the consent link is unknown, already used or expired: start again",
            [ErrorDetail(("query", "state"), "not a live state of ours")],
        )
    return str(row[0]), dict(row[1] or {})


async def finish_graph_consent(
    db: Database, params: Mapping[str, str], read_domains: DomainReader
) -> ConsentOutcome:
    """Records what Microsoft answered: the directory and its domains, or the refusal."""
    async with db.session() as s, s.begin():
        tenant_id, _ = await take_state(s, params.get("state", ""), ADMIN_CONSENT)
        tenant = await s.get(Tenant, tenant_id)
        name = tenant.name if tenant else tenant_id

    async def refuse(reason: str) -> ConsentOutcome:
        await _record(db, tenant_id, ConnectionState.REFUSED, error=reason[:300])
        return ConsentOutcome(name, ConnectionState.REFUSED, f"Not connected: {reason[:300]}")

    if params.get("error"):
        return await refuse((params.get("error_description") or params["error"]).split("\n")[0])
    directory = params.get("tenant", "")
    if params.get("admin_consent", "").lower() != "true" or not _DIRECTORY_ID.match(directory):
        raise BadRequest(
            "Microsoft's answer names no consented directory",
            [ErrorDetail(("query", "tenant"), "an Entra tenant id with admin_consent=True")],
        )
    directory = directory.lower()
    async with db.session() as s:
        other = await s.scalar(
            select(TenantConnection.tenant_id).where(
                TenantConnection.directory == directory, TenantConnection.tenant_id != tenant_id
            )
        )
    if other is not None:
        return await refuse("this Microsoft 365 organisation is connected to another tenant")
    try:
        domains = await read_domains(directory)
    except ProviderError as exc:
        return await refuse(f"the consent could not be used: {exc}")
    await _record(db, tenant_id, ConnectionState.CONNECTED, directory=directory, domains=domains)
    return ConsentOutcome(
        name, ConnectionState.CONNECTED, f"Connected: {', '.join(domains) or 'no domains'}"
    )


async def _record(
    db: Database,
    tenant_id: str,
    state: ConnectionState,
    *,
    directory: str | None = None,
    domains: list[str] | None = None,
    error: str | None = None,
) -> None:
    """Stores the outcome; a connected directory's domains become the tenant's Graph domains
    (a refusal keeps an earlier connection's directory and domains)."""
    async with db.session() as s, s.begin():
        row = await s.get(TenantConnection, (tenant_id, "graph"))
        if row is None:
            row = TenantConnection(tenant_id=tenant_id, provider="graph", domains=[])
            s.add(row)
        if state == ConnectionState.REFUSED and row.state == ConnectionState.CONNECTED:
            row.error = f"a later consent was refused ({error}); the earlier one still holds"
            return
        row.state, row.error = state, error
        if state == ConnectionState.CONNECTED and domains is not None:
            row.directory, row.domains = directory, domains
            await _replace_domains(s, tenant_id, "graph", domains)
            await wake(s, tenant_id, Operation.mailbox.like("graph:%"))


async def reconnect_needed(db: Database, tenant_id: str, provider: str, error: str) -> None:
    """A worker found the tenant's access withdrawn: the connection says so and the CRM gets
    one signed ``connection.reconnect_needed`` callback (not one per operation)."""
    async with db.session() as s, s.begin():
        row = await s.get(TenantConnection, (tenant_id, provider), with_for_update=True)
        if row is None:
            row = TenantConnection(tenant_id=tenant_id, provider=provider, domains=[])
            s.add(row)
        elif row.state == ConnectionState.RECONNECT_NEEDED:
            return
        row.state, row.error = ConnectionState.RECONNECT_NEEDED, error[:300]
        payload: CallbackTask = {
            "type": "connection.reconnect_needed",
            "provider": provider,
            "error": error[:300],
        }
        enqueue_callback(s, tenant_id, payload)


async def wake(session: AsyncSession, tenant_id: str, mailboxes: ColumnElement[bool]) -> None:
    """Access is back: the tenant's waiting operations in ``mailboxes`` go now, not at their
    next look."""
    await session.execute(
        update(Operation)
        .where(Operation.tenant_id == tenant_id, Operation.state == OpState.PENDING, mailboxes)
        .values(not_before=utcnow())
        .execution_options(synchronize_session=False)
    )


async def tenant_links(session: AsyncSession, box: SecretBox, tenant_id: str) -> TenantLinks:
    """The Entra tenant whose app tokens reach this tenant's mailboxes and the tenant's own
    Google key (``None``: the install's defaults)."""
    rows = {
        row.provider: row
        for row in await session.scalars(
            select(TenantConnection).where(TenantConnection.tenant_id == tenant_id)
        )
    }
    graph, google = rows.get("graph"), rows.get("google")
    return TenantLinks(
        directory=graph.directory if graph is not None else None,
        google_key=box.decrypt(google.secret) if google is not None and google.secret else None,
    )
