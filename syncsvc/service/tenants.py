"""Tenants, their API keys and their callback signing secrets.

A key is shown once, when it is made, and only its SHA-256 is stored; every request looks the
hash up in the database, so a key made by ``syncsvc tenants create`` in another process works
at once and nothing about keys is cached in the server.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.errors import Conflict, ErrorDetail, ValidationError
from syncsvc.service import signing
from syncsvc.store.crypto import SecretBox, hash_token
from syncsvc.store.db import Database
from syncsvc.store.models import Tenant

API_KEY_PREFIX = "sk_"
API_KEY_RANDOM_BYTES = 32
TENANT_NAME_MAX_CHARS = 200
DEV_TENANT_NAME = "dev"


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(API_KEY_RANDOM_BYTES)


async def create_tenant(db: Database, name: str) -> tuple[Tenant, str]:
    """Creates a tenant and returns it with its API key (the only time the key is known).
    Its signing secret is made at its first signed request; ``create_tenant_with_secret``
    makes (and shows) it at once."""
    tenant, key, _ = await _create(db, name, None)
    return tenant, key


async def create_tenant_with_secret(
    db: Database, name: str, box: SecretBox
) -> tuple[Tenant, str, str]:
    """Creates a tenant with its API key and its Standard Webhooks signing secret, both shown
    only now."""
    tenant, key, secret = await _create(db, name, box)
    assert secret is not None
    return tenant, key, secret


async def _create(db: Database, name: str, box: SecretBox | None) -> tuple[Tenant, str, str | None]:
    name = name.strip()
    if not name or len(name) > TENANT_NAME_MAX_CHARS:
        raise ValidationError(
            "invalid tenant name",
            [ErrorDetail(("name",), f"must be 1 to {TENANT_NAME_MAX_CHARS} characters")],
        )
    key = new_api_key()
    tenant = Tenant(id="ten_" + secrets.token_hex(8), name=name, api_key_hash=hash_token(key))
    secret = None if box is None else signing.set_new_secret(tenant, box, datetime.now(UTC))
    async with db.session() as session:
        session.add(tenant)
        try:
            await session.commit()
        except IntegrityError as exc:
            raise Conflict(
                f"a tenant named {name!r} exists already", [ErrorDetail(("name",), "taken")]
            ) from exc
    return tenant, key, secret


async def tenant_for_key(session: AsyncSession, api_key: str) -> Tenant | None:
    if not api_key.startswith(API_KEY_PREFIX):
        return None
    found: Tenant | None = await session.scalar(
        select(Tenant).where(Tenant.api_key_hash == hash_token(api_key))
    )
    return found


async def ensure_dev_tenant(db: Database) -> str | None:
    """On an empty database, creates the tenant ``dev`` and returns its key, so ``serve``
    works out of the box; afterwards (or if another process won the race) returns None."""
    async with db.session() as session:
        tenants = await session.scalar(select(func.count()).select_from(Tenant))
    if tenants:
        return None
    try:
        _, key = await create_tenant(db, DEV_TENANT_NAME)
    except Conflict:
        return None
    return key
