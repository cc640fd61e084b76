"""Which tenant a Graph mailbox or Google calendar belongs to (issue 10, "Mailbox ownership").

A mailbox belongs to at most one tenant: the first tenant to register it claims it in
``mailbox_owners``; another tenant registering it gets 409, so no subscription, days-off read
or event of one tenant ever reaches another's mailbox. Once a tenant has domains for a provider
(``syncsvc tenants domains add``), its mailboxes there must be in one of them (else 422).
The claim goes when the tenant's last user of that mailbox moves elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.errors import Conflict, ErrorDetail, NotFound, ValidationError
from syncsvc.store.models import MailboxOwner, Tenant, TenantDomain, User

#: The field of a connection that names the mailbox, for providers where mailboxes are owned.
ADDRESS_FIELDS = {"graph": "mailbox", "google": "calendar_id"}


def address_of(provider: str, config: Mapping[str, Any]) -> str | None:
    name = ADDRESS_FIELDS.get(provider)
    value = config.get(name) if name else None
    return str(value).strip().lower() if value else None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


async def claim(
    session: AsyncSession,
    tenant_id: str,
    provider: str,
    config: Mapping[str, Any],
    *,
    signed_in: bool = False,
) -> None:
    """Claims the connection's mailbox for the tenant, or refuses it (422 / 409). An account
    the user ``signed_in`` with through their own consent needs no domain of the tenant."""
    address = address_of(provider, config)
    if address is None:
        return
    loc = ("body", "calendar", ADDRESS_FIELDS[provider])
    domains = set(
        await session.scalars(
            select(TenantDomain.domain).where(
                TenantDomain.tenant_id == tenant_id, TenantDomain.provider == provider
            )
        )
    )
    if domains and not signed_in and domain_of(address) not in domains:
        raise ValidationError(
            f"mailbox {address} is not covered by this tenant's {provider} connection",
            [ErrorDetail(loc, f"its domain is not one of {', '.join(sorted(domains))}")],
        )
    owner = await session.get(MailboxOwner, (provider, address))
    if owner is None:
        try:
            async with session.begin_nested():
                session.add(MailboxOwner(provider=provider, address=address, tenant_id=tenant_id))
        except IntegrityError:
            owner = await session.get(MailboxOwner, (provider, address), populate_existing=True)
    if owner is not None and owner.tenant_id != tenant_id:
        raise Conflict(f"mailbox {address} belongs to another tenant", [ErrorDetail(loc, "taken")])


async def release(
    session: AsyncSession, tenant_id: str, provider: str, config: Mapping[str, Any]
) -> None:
    """Lets the mailbox go if no user of the tenant uses it any more."""
    address = address_of(provider, config)
    if address is None:
        return
    field = ADDRESS_FIELDS[provider]
    users = await session.scalar(
        select(func.count())
        .select_from(User)
        .where(
            User.tenant_id == tenant_id,
            User.calendar_provider == provider,
            func.lower(User.calendar_config[field].as_string()) == address,
        )
    )
    if not users:
        await session.execute(
            delete(MailboxOwner).where(
                MailboxOwner.provider == provider,
                MailboxOwner.address == address,
                MailboxOwner.tenant_id == tenant_id,
            )
        )


async def add_domain(session: AsyncSession, tenant_id: str, provider: str, domain: str) -> None:
    """``syncsvc tenants domains add``: the tenant's connection covers this domain."""
    if await session.get(Tenant, tenant_id) is None:
        raise NotFound(f"unknown tenant {tenant_id}")
    domain = normalized_domain(domain)
    if await session.get(TenantDomain, (tenant_id, provider, domain)) is None:
        session.add(TenantDomain(tenant_id=tenant_id, provider=provider, domain=domain))


def normalized_domain(domain: str, loc: tuple[str | int, ...] = ()) -> str:
    """``Alko.Example`` / ``@alko.example`` → ``alko.example``; anything else is a 422."""
    name = domain.strip().lower().lstrip("@")
    if not name or "@" in name or "." not in name or len(name) > 253 or " " in name:
        raise ValidationError(
            f"{domain!r} is not a domain name", [ErrorDetail(loc, "a domain name")] if loc else []
        )
    return name
