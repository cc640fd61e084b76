"""A user connects their own calendar (OAuth authorization code + PKCE): for organisations that
grant no app-only access, and for personal accounts.

``start`` makes a single-use ``state`` bound to the tenant and the user, remembers the PKCE
verifier (encrypted) and the return URL (one of the tenant's ``return_origins``), and answers
the provider's consent URL. The provider sends the user's browser to
``/oauth/<provider>/callback``, where ``finish`` trades the code for a refresh token, stores
it encrypted, points the user's calendar at the account that signed in and sends the browser
back to the return URL with the outcome in its query.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any
from urllib.parse import urlencode, urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.changes.apply import enqueue_callback
from syncsvc.config import Settings
from syncsvc.errors import (
    BadRequest,
    Conflict,
    ErrorDetail,
    Forbidden,
    NotFound,
    ProviderError,
    ValidationError,
)
from syncsvc.providers import google_oauth, graph_oauth
from syncsvc.queue.outbox import CALENDAR_KEY_BY_PROVIDER, CallbackTask
from syncsvc.service.tenant_connections import (
    STATE_TTL,
    ConnectionState,
    state_hash,
    take_state,
    wake,
)
from syncsvc.service.users import set_calendar
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import OAuthState, Operation, Tenant, User
from syncsvc.store.types import utcnow

USER_CONNECT = "user_connect"


def callback_url(settings: Settings, provider: str) -> str:
    return f"{settings.public_base_url.rstrip('/')}/oauth/{provider}/callback"


def origin_of(url: str, *, exact: bool = False) -> str:
    """``https://CRM.example:443/x`` → ``https://crm.example``; ``exact``: the URL must be an
    origin and nothing more (no path, query or fragment)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL")
    if exact and (parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError("must be an origin (scheme, host and port only)")
    default = {"http": 80, "https": 443}[parts.scheme]
    port = f":{parts.port}" if parts.port and parts.port != default else ""
    return f"{parts.scheme}://{parts.hostname.lower()}{port}"


async def start(
    session: AsyncSession,
    settings: Settings,
    box: SecretBox,
    tenant_id: str,
    user_id: str,
    provider: str,
    return_url: str,
) -> str:
    """The provider's consent URL for this user."""
    if await session.get(User, (tenant_id, user_id)) is None:
        raise NotFound(f"unknown user {user_id}")
    if provider == "google" and not (settings.google_client_id and settings.google_client_secret):
        raise ValidationError("Google sign-in is not configured on this install")
    if provider == "graph" and not (settings.graph_client_id and settings.graph_client_secret):
        raise ValidationError("Microsoft sign-in is not configured on this install")
    tenant = await session.get(Tenant, tenant_id)
    allowed = list(tenant.return_origins) if tenant else []
    if origin_of(return_url) not in allowed:
        raise ValidationError(
            "return_url is not on one of the tenant's return origins",
            [ErrorDetail(("body", "return_url"), f"allowed: {', '.join(allowed) or 'none set'}")],
        )
    state = secrets.token_urlsafe(32)
    redirect_uri = callback_url(settings, provider)
    flow: dict[str, Any]
    if provider == "graph":
        url, flow = await asyncio.to_thread(
            graph_oauth.authorization_url, settings, redirect_uri, state
        )
    else:
        url, verifier = google_oauth.authorization_url(settings, redirect_uri, state)
        flow = {"verifier": verifier}
    session.add(
        OAuthState(
            state_hash=state_hash(state),
            tenant_id=tenant_id,
            purpose=USER_CONNECT,
            expires_at=utcnow() + STATE_TTL,
            payload={
                "user_id": user_id,
                "provider": provider,
                "return_url": return_url,
                "flow": box.encrypt(flow).decode(),  # PKCE verifier (and nonce): secret
            },
        )
    )
    return url


def _back(return_url: str, **outcome: str) -> str:
    joiner = "&" if urlsplit(return_url).query else "?"
    return f"{return_url}{joiner}{urlencode(outcome)}"


async def finish(
    db: Database, settings: Settings, box: SecretBox, provider: str, params: dict[str, str]
) -> str:
    """Where to send the user's browser: the return URL, told ``connect=connected`` (with
    ``account``), ``refused`` or ``failed`` (with ``error``)."""
    async with db.session() as s, s.begin():
        tenant_id, payload = await take_state(s, params.get("state", ""), USER_CONNECT)
    if payload.get("provider") != provider:
        raise Forbidden("the consent link was made for another provider")
    back, user_id = str(payload["return_url"]), str(payload["user_id"])
    if params.get("error"):
        return _back(back, connect="refused", user_id=user_id, error=params["error"][:200])
    if not params.get("code"):
        raise BadRequest("the provider's answer has no code", [ErrorDetail(("query", "code"), "")])
    flow = box.decrypt(str(payload["flow"]).encode())
    try:
        account, config, secret = await _exchange(settings, provider, flow, params)
    except ProviderError as exc:
        return _back(back, connect="failed", user_id=user_id, error=str(exc)[:200])
    try:
        async with db.session() as s, s.begin():
            user = await s.get(User, (tenant_id, user_id))
            if user is None:
                return _back(back, connect="failed", user_id=user_id, error="no such user")
            await set_calendar(s, box, user, provider, config, secret, signed_in=True)
            await wake(s, tenant_id, Operation.mailbox == f"{provider}:{account}")
    except Conflict:
        error = f"{account} is connected to another tenant"
        return _back(back, connect="failed", user_id=user_id, error=error)
    return _back(back, connect="connected", user_id=user_id, account=account)


async def _exchange(
    settings: Settings, provider: str, flow: dict[str, Any], params: dict[str, str]
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The signed-in account, the calendar settings and the secret (the grant) to store."""
    if provider == "graph":
        answer = {"code": params["code"], "state": params["state"]}
        ms = await asyncio.to_thread(graph_oauth.exchange_code, settings, flow, answer)
        grant = {"refresh_token": ms.refresh_token, "directory": ms.directory}
        return ms.account, {"mailbox": ms.account}, {"oauth": grant}
    g = await asyncio.to_thread(
        google_oauth.exchange_code,
        settings,
        callback_url(settings, provider),
        params["code"],
        str(flow["verifier"]),
    )
    oauth: dict[str, str | None] = {
        "refresh_token": g.refresh_token,
        "client_id": settings.google_client_id,
        "client_secret": settings.google_client_secret,
    }
    return g.email, {"calendar_id": g.email}, {"oauth": oauth}


async def grant_revoked(
    db: Database, tenant_id: str, provider: str, account: str, error: str
) -> None:
    """The provider refused a user's own grant: their connection says ``reconnect_needed``
    and the CRM gets one signed ``connection.reconnect_needed`` callback naming the user (not
    one per operation); their operations wait until they connect again."""
    field = CALENDAR_KEY_BY_PROVIDER.get(provider)
    if field is None:
        return
    async with db.session() as s, s.begin():
        users = await s.scalars(
            select(User)
            .where(
                User.tenant_id == tenant_id,
                User.calendar_provider == provider,
                User.calendar_config[field].as_string() == account,
                User.connection_state == ConnectionState.CONNECTED,
            )
            .with_for_update()
        )
        for user in users:
            user.connection_state = ConnectionState.RECONNECT_NEEDED
            user.connection_error = error[:300]
            payload: CallbackTask = {
                "type": "connection.reconnect_needed",
                "provider": provider,
                "user_id": user.id,
                "account": account,
                "error": error[:300],
            }
            enqueue_callback(s, tenant_id, payload)
