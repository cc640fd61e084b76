"""The calling tenant's own settings: where callbacks go, and its closing days.

(``tenants.py`` makes tenants and their keys; this module is what a tenant may read and change
about itself through ``/v1/tenant``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.errors import NotFound
from syncsvc.store.models import Tenant


@dataclass(frozen=True, slots=True)
class TenantView:
    id: str
    name: str
    callback_url: str | None
    closing_days: tuple[date, ...]
    return_origins: tuple[str, ...]


def _view(tenant: Tenant) -> TenantView:
    return TenantView(
        id=tenant.id,
        name=tenant.name,
        callback_url=tenant.callback_url,
        closing_days=tuple(sorted(date.fromisoformat(str(d)) for d in tenant.closing_days)),
        return_origins=tuple(tenant.return_origins or ()),
    )


async def _load(session: AsyncSession, tenant_id: str) -> Tenant:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound("unknown tenant")
    return tenant


async def get(session: AsyncSession, tenant_id: str) -> TenantView:
    return _view(await _load(session, tenant_id))


@dataclass(frozen=True, slots=True)
class TenantChanges:
    """What a PATCH sets. ``callback_url`` counts only with ``sets_callback_url`` (so that
    ``None`` can clear it); ``closing_days=None`` leaves the list as it is."""

    sets_callback_url: bool = False
    callback_url: str | None = None
    closing_days: Sequence[date] | None = None
    return_origins: Sequence[str] | None = None


async def patch(session: AsyncSession, tenant_id: str, changes: TenantChanges) -> TenantView:
    """Changes the fields given. Without a callback URL, deliveries are done at once: nothing
    waits for a CRM that does not listen."""
    tenant = await _load(session, tenant_id)
    if changes.sets_callback_url:
        tenant.callback_url = changes.callback_url
    if changes.closing_days is not None:
        tenant.closing_days = sorted({d.isoformat() for d in changes.closing_days})
    if changes.return_origins is not None:
        tenant.return_origins = sorted(set(changes.return_origins))
    return _view(tenant)
