"""``/v1/tenant/connections``: the tenant's Microsoft 365 connection (admin consent, and the
page Microsoft sends the administrator back to) and its Google Workspace domains and key."""

from __future__ import annotations

from html import escape
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from syncsvc.api._framework import Ctx, Routes
from syncsvc.api.plan_schemas import instant
from syncsvc.service import tenant_connections as service
from syncsvc.service import user_connect
from syncsvc.service.connections import UserProviders
from syncsvc.service.users import check_http_url

routes = Routes(tag="connections")

PROVIDERS: web.AppKey[UserProviders] = web.AppKey("providers", UserProviders)
PARAM_MAX_CHARS = 2000
DOMAINS_MAX = 50
DOMAIN_MAX_CHARS = 253
#: The consent page is ours alone: no script, no other origin, no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ConnectionOut(BaseModel):
    provider: str
    state: service.ConnectionState = Field(
        description="pending | connected | refused | reconnect_needed"
    )
    directory: str | None = Field(description="Graph: the consented Entra tenant id.")
    domains: list[str] = Field(
        description="Graph: the directory's verified domains; Google: the Workspace domains."
    )
    service_account: str | None = Field(
        description="Google: the tenant's own service account, if it gave a key (else the "
        "install's)."
    )
    error: str | None
    updated_at: str


class ConnectionsOut(BaseModel):
    items: list[ConnectionOut]


class GoogleConnectionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    domains: list[Annotated[str, Field(max_length=DOMAIN_MAX_CHARS)]] = Field(
        min_length=1,
        max_length=DOMAINS_MAX,
        description="The tenant's Workspace domains; its users' calendars must be in them.",
    )
    service_account: dict[str, Any] | None = Field(
        default=None,
        description="The tenant's own service-account JSON key, with domain-wide delegation "
        "for the calendar scope; stored encrypted, never shown again. Left out: the install's.",
    )


class ConsentLinkOut(BaseModel):
    consent_url: str = Field(description="Send the tenant's administrator here.")
    state: str = Field(description="Single-use, bound to this tenant, valid 15 minutes.")


class AdminConsentQuery(BaseModel):
    """What Microsoft appends to the redirect URI (success or refusal)."""

    model_config = ConfigDict(extra="ignore")

    state: str = Field(min_length=1, max_length=PARAM_MAX_CHARS)
    tenant: str = Field(default="", max_length=PARAM_MAX_CHARS)
    admin_consent: str = Field(default="", max_length=PARAM_MAX_CHARS)
    error: str = Field(default="", max_length=PARAM_MAX_CHARS)
    error_description: str = Field(default="", max_length=PARAM_MAX_CHARS)


def _out(view: service.ConnectionView) -> ConnectionOut:
    return ConnectionOut(
        provider=view.provider,
        state=view.state,
        directory=view.directory,
        domains=view.domains,
        service_account=view.service_account,
        error=view.error,
        updated_at=instant(view.updated_at) or "",
    )


@routes.endpoint(
    "GET", "/v1/tenant/connections", response=ConnectionsOut, summary="The tenant's connections"
)
async def list_connections(ctx: Ctx) -> ConnectionsOut:
    """Each organisation-wide connection with its state and verified domains."""
    async with ctx.session() as session:
        views = await service.list_connections(session, ctx.box, ctx.tenant_id)
    return ConnectionsOut(items=[_out(v) for v in views])


@routes.endpoint(
    "PUT",
    "/v1/tenant/connections/google",
    body=GoogleConnectionIn,
    response=ConnectionOut,
    summary="Connect Google Workspace (domains, optionally the tenant's own service account)",
)
async def put_google(ctx: Ctx, body: GoogleConnectionIn) -> ConnectionOut:
    """Replaces the tenant's Google connection. A domain connected to another tenant is a
    409; a key that is not a service-account key a 422."""
    async with ctx.session() as session, session.begin():
        view = await service.put_google(
            session, ctx.box, ctx.tenant_id, body.domains, body.service_account
        )
    return _out(view)


@routes.endpoint(
    "POST",
    "/v1/tenant/connections/graph",
    response=ConsentLinkOut,
    summary="Start connecting Microsoft 365 (admin consent)",
)
async def start_graph(ctx: Ctx) -> ConsentLinkOut:
    """A Microsoft admin-consent link for the tenant's administrator; once they accept, the
    tenant's mailboxes are reached with app tokens of their own Entra tenant only."""
    async with ctx.session() as session, session.begin():
        url, state = await service.start_graph_consent(session, ctx.settings, ctx.tenant_id)
    return ConsentLinkOut(consent_url=url, state=state)


@routes.endpoint(
    "GET",
    service.ADMIN_CONSENT_PATH,
    query=AdminConsentQuery,
    media_type="text/html",
    error_statuses=(403,),
    summary="Where Microsoft sends the administrator after admin consent",
)
async def graph_admin_consent(ctx: Ctx, query: AdminConsentQuery) -> web.Response:
    """Records the consented directory (or the refusal) for the tenant the ``state`` was made
    for; a forged, used or expired ``state`` is a 403 and changes nothing."""
    outcome = await service.finish_graph_consent(
        ctx.db, query.model_dump(), ctx.request.app[PROVIDERS].verified_domains
    )
    title = "Microsoft 365 connected" if outcome.state == "connected" else "Not connected"
    body = (
        f"<!doctype html><html lang=en><meta charset=utf-8><title>{escape(title)}</title>"
        f'<main style="font-family:sans-serif;max-width:40em;margin:3em auto">'
        f"<h1>{escape(title)}</h1><p>syncsvc tenant <b>{escape(outcome.tenant_name)}</b>: "
        f'<span id="outcome" data-state="{escape(outcome.state)}">{escape(outcome.message)}'
        "</span></p><p>You can close this window.</p></main></html>"
    )
    return web.Response(text=body, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)


class UserConnectPath(BaseModel):
    user_id: str = Field(min_length=1, max_length=200)


class UserConnectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: Literal["graph", "google"] = Field(
        description="The calendar the user signs in to: `graph` (a Microsoft 365 work or "
        "school account) or `google`."
    )
    return_url: str = Field(
        max_length=PARAM_MAX_CHARS,
        description="Where the browser goes afterwards, on one of the tenant's "
        "`return_origins`; its query gets `connect=connected|refused|failed`.",
    )

    @field_validator("return_url")
    @classmethod
    def _http(cls, value: str) -> str:
        return check_http_url(value)


class UserConnectOut(BaseModel):
    url: str = Field(description="Send the user's browser here (valid 15 minutes, once).")


class CallbackPath(BaseModel):
    provider: Literal["graph", "google"]


class CallbackQuery(BaseModel):
    """What the provider appends to the redirect URI (success or refusal)."""

    model_config = ConfigDict(extra="ignore")

    state: str = Field(min_length=1, max_length=PARAM_MAX_CHARS)
    code: str = Field(default="", max_length=PARAM_MAX_CHARS)
    error: str = Field(default="", max_length=PARAM_MAX_CHARS)


@routes.endpoint(
    "POST",
    "/v1/users/{user_id}/connect",
    path=UserConnectPath,
    body=UserConnectIn,
    response=UserConnectOut,
    summary="A user connects their own calendar (OAuth, authorization code + PKCE)",
)
async def connect_user(ctx: Ctx, path: UserConnectPath, body: UserConnectIn) -> UserConnectOut:
    """The provider's consent URL for the user; after consent the user's calendar is the
    account they signed in with, reached with their own grant."""
    async with ctx.session() as session, session.begin():
        url = await user_connect.start(
            session,
            ctx.settings,
            ctx.box,
            ctx.tenant_id,
            path.user_id,
            body.provider,
            body.return_url,
        )
    return UserConnectOut(url=url)


@routes.endpoint(
    "GET",
    "/oauth/{provider}/callback",
    path=CallbackPath,
    query=CallbackQuery,
    status=302,
    error_statuses=(403,),
    summary="Where the provider sends the user after consent",
)
async def user_callback(ctx: Ctx, path: CallbackPath, query: CallbackQuery) -> web.Response:
    """Stores the grant and redirects to the return URL; a forged, used or expired ``state``
    is a 403 and changes nothing."""
    target = await user_connect.finish(
        ctx.db, ctx.settings, ctx.box, path.provider, query.model_dump()
    )
    return web.Response(status=302, headers={"Location": target, **PAGE_HEADERS})
