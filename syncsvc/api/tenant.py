"""``/v1/tenant``: the calling tenant's callback URL and closing days."""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel, Field, field_validator

from syncsvc.api._framework import Ctx, Routes
from syncsvc.service import tenant as service
from syncsvc.service.users import check_http_url

routes = Routes(tag="tenant")

URL_MAX_CHARS = 2000
CLOSING_DAYS_MAX = 1000


class TenantOut(BaseModel):
    id: str
    name: str
    callback_url: str | None = Field(
        description="Where user edits and deletions are POSTed, signed "
        "(`X-Syncsvc-Signature: sha256=<hex HMAC-SHA256 of the body>`)."
    )
    closing_days: list[date] = Field(description="Days the whole organisation is closed.")


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
    )
    async with ctx.session() as session, session.begin():
        return _out(await service.patch(session, ctx.tenant_id, changes))
