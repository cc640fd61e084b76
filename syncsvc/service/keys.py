"""``syncsvc rotate-keys``: every secret at rest re-encrypted with the current ``SECRET_KEY``.

Rotating the key means: set the new ``SYNCSVC_SECRET_KEY`` and the old one as
``SYNCSVC_SECRET_KEY_PREVIOUS`` (every process then reads both), run this once, then drop
``_PREVIOUS``. Rows are re-encrypted a chunk per transaction, so running processes go on, and
a second run (or one cut short and started again) is harmless: a secret already under the new
key is encrypted anew under it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute

from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import OAuthState, Tenant, TenantConnection, User

CHUNK = 500
#: Every encrypted column (``LargeBinary`` in store/models.py).
ENCRYPTED: tuple[InstrumentedAttribute[bytes | None], ...] = (
    Tenant.signing_secret,
    Tenant.previous_signing_secret,
    User.calendar_secret,
    TenantConnection.secret,
)


async def rotate_all(db: Database, box: SecretBox) -> int:
    """Re-encrypts every stored secret; answers how many."""
    done = 0
    for column in ENCRYPTED:
        model: Any = column.class_
        keys = [tuple(k) for k in await _keys(db, model, column)]
        for start in range(0, len(keys), CHUNK):
            async with db.session() as s, s.begin():
                for key in keys[start : start + CHUNK]:
                    row = await s.get(model, key)
                    sealed = getattr(row, column.key, None) if row is not None else None
                    if sealed:
                        setattr(row, column.key, box.rotate(sealed))
                        done += 1
    async with db.session() as s, s.begin():  # consent links in flight (15 minutes at most)
        for state in await s.scalars(select(OAuthState).where(OAuthState.used_at.is_(None))):
            sealed = state.payload.get("flow")
            if isinstance(sealed, str):
                state.payload = {**state.payload, "flow": box.rotate(sealed.encode()).decode()}
                done += 1
    return done


async def _keys(db: Database, model: Any, column: InstrumentedAttribute[bytes | None]) -> Any:
    primary = list(model.__mapper__.primary_key)
    async with db.session() as s:
        return (await s.execute(select(*primary).where(column.is_not(None)))).all()
