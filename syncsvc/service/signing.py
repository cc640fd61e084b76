"""Per-tenant signing secrets: every request to a CRM is signed per Standard Webhooks 1.0.

Each tenant has its own ``whsec_…`` secret (stored encrypted with the secret box), so a CRM that
can verify its own callbacks learns nothing that forges another tenant's. Requests carry
``webhook-id`` (the same on every retry of one message), ``webhook-timestamp`` (Unix seconds)
and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of id.timestamp.body>``). After a rotation
the previous secret signs beside the new one for ``ROTATION_OVERLAP``: the signatures are
space-separated, so a CRM verifies with either secret while it switches over.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession
from standardwebhooks import Webhook

from syncsvc.errors import NotFound
from syncsvc.store.crypto import SecretBox
from syncsvc.store.models import Tenant

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
ROTATION_OVERLAP = timedelta(hours=24)
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _seal(box: SecretBox, secret: str) -> bytes:
    return box.encrypt({"secret": secret})


def _open(box: SecretBox, sealed: bytes) -> str:
    return str(box.decrypt(sealed)["secret"])


def set_new_secret(tenant: Tenant, box: SecretBox, now: datetime) -> str:
    """Gives the tenant a fresh secret; the one it had keeps signing for ``ROTATION_OVERLAP``.
    Returns the new secret, the only time it is seen in clear outside signing."""
    secret = new_secret()
    if tenant.signing_secret is not None:
        tenant.previous_signing_secret = tenant.signing_secret
        tenant.previous_signing_secret_until = now + ROTATION_OVERLAP
    tenant.signing_secret = _seal(box, secret)
    return secret


async def rotate(session: AsyncSession, box: SecretBox, tenant_id: str, now: datetime) -> str:
    tenant = await session.get(Tenant, tenant_id, with_for_update=True)
    if tenant is None:
        raise NotFound("unknown tenant")
    return set_new_secret(tenant, box, now)


async def signing_secrets(
    session: AsyncSession, box: SecretBox, tenant_id: str, now: datetime
) -> list[str]:
    """The secrets that sign now: the current one, then the previous one while it overlaps.
    A tenant made before secrets existed gets one here (its CRM fetches it by rotating)."""
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound("unknown tenant")
    if tenant.signing_secret is None:
        # Only if still none: two first deliveries at once must not each keep their own.
        await session.execute(
            update(Tenant)
            .where(Tenant.id == tenant_id, Tenant.signing_secret.is_(None))
            .values(signing_secret=_seal(box, new_secret()))
        )
        await session.commit()
        await session.refresh(tenant)
    assert tenant.signing_secret is not None
    found = [_open(box, tenant.signing_secret)]
    until = tenant.previous_signing_secret_until
    if tenant.previous_signing_secret is not None and until is not None and now < until:
        found.append(_open(box, tenant.previous_signing_secret))
    return found


def signed_headers(
    secrets_: Sequence[str], message_id: str, body: str, now: datetime
) -> dict[str, str]:
    """The three Standard Webhooks headers for one message, one signature per secret."""
    signatures = " ".join(Webhook(s).sign(message_id, now, body) for s in secrets_)
    return {
        ID_HEADER: message_id,
        TIMESTAMP_HEADER: str(int(now.timestamp())),
        SIGNATURE_HEADER: signatures,
    }
