"""``/v1/tenant``: the calling tenant's callback URL, closing days and signing secret."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated

from pydantic import BaseModel, Field, field_validator

from syncsvc.api._framework import Ctx, Routes
from syncsvc.service import signing
from syncsvc.service import tenant as service
from syncsvc.service.user_connect import origin_of
from syncsvc.service.users import check_http_url

routes = Routes(tag="tenant")

URL_MAX_CHARS = 2000
CLOSING_DAYS_MAX = 1000
RETURN_ORIGINS_MAX = 20


class TenantOut(BaseModel):
    id: str
    name: str
    callback_url: str | None = Field(
        description="Where user edits and deletions are POSTed, signed per Standard "
        "Webhooks 1.0 with the tenant's own secret (`webhook-id`, `webhook-timestamp`, "
        "`webhook-signature`)."
    )
    closing_days: list[date] = Field(description="Days the whole organisation is closed.")
    return_origins: list[str] = Field(
        description="Origins a user's calendar connect may return the browser to."
    )


class TenantPatch(BaseModel):
    callback_url: str | None = Field(
        default=None,
        max_length=URL_MAX_CHARS,
        description="An http(s) URL; `null` stops callbacks. Left out: unchanged.",
    )
    closing_days: list[date] | None = Field(
        default=None,
        max_length=CLOSING_DAYS_MAX,
        description="Replaces the list. Left out: unchanged.",
    )
    return_origins: list[Annotated[str, Field(max_length=URL_MAX_CHARS)]] | None = Field(
        default=None,
        max_length=RETURN_ORIGINS_MAX,
        description="Replaces the list of origins (`https://crm.example`) that "
        "`POST /v1/users/{id}/connect` may return to. Left out: unchanged.",
    )

    @field_validator("return_origins")
    @classmethod
    def _origins(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [origin_of(check_http_url(v), exact=True) for v in value]

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)


def _out(view: service.TenantView) -> TenantOut:
    return TenantOut(
        id=view.id,
        name=view.name,
        callback_url=view.callback_url,
        closing_days=list(view.closing_days),
        return_origins=list(view.return_origins),
    )


@routes.endpoint("GET", "/v1/tenant", response=TenantOut, summary="The calling tenant")
async def get_tenant(ctx: Ctx) -> TenantOut:
    """The tenant the API key belongs to."""
    async with ctx.session() as session:
        return _out(await service.get(session, ctx.tenant_id))


@routes.endpoint(
    "PATCH", "/v1/tenant", body=TenantPatch, response=TenantOut, summary="Change the tenant"
)
async def patch_tenant(ctx: Ctx, body: TenantPatch) -> TenantOut:
    """Sets the callback URL and/or the closing days; fields left out stay as they are."""
    changes = service.TenantChanges(
        sets_callback_url="callback_url" in body.model_fields_set,
        callback_url=body.callback_url,
        closing_days=body.closing_days,
        return_origins=body.return_origins,
    )
    async with ctx.session() as session, session.begin():
        return _out(await service.patch(session, ctx.tenant_id, changes))


class SigningSecretOut(BaseModel):
    signing_secret: str = Field(
        description="The new `whsec_…` secret, shown only now; it signs from now on."
    )
    previous_valid_until: datetime = Field(
        description="Until then the previous secret signs too (a second, space-separated "
        "signature in `webhook-signature`), so the CRM can switch without losing a callback."
    )


@routes.endpoint(
    "POST",
    "/v1/tenant/signing-secret/rotate",
    response=SigningSecretOut,
    summary="Rotate the signing secret",
)
async def rotate_signing_secret(ctx: Ctx) -> SigningSecretOut:
    """Makes a new signing secret; the old one keeps signing beside it for 24 hours."""
    now = datetime.now(UTC)
    async with ctx.session() as session, session.begin():
        secret = await signing.rotate(session, ctx.box, ctx.tenant_id, now)
    return SigningSecretOut(
        signing_secret=secret, previous_valid_until=now + signing.ROTATION_OVERLAP
    )
