"""``Idempotency-Key`` on POST: the first 2xx answer is stored and replayed for the same body.

A key is first *reserved* (``status`` 0) before the handler runs, so two concurrent requests
with one key cannot both act: the second gets a 409. Only 2xx answers are kept; any other
outcome releases the reservation so the client may retry with the same key. A reservation
left by a crashed process expires after ``RESERVATION_TTL_S``; a kept answer after
``ANSWER_TTL`` (as Stripe's keys do), when the key may be used afresh; the workers prune
expired answers (``service/retention.py``). An answer longer than
``ANSWER_MAX_CHARS`` is kept as its status with a short note instead of its body: the write
still happens once, and a replay says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.errors import Conflict, ErrorDetail
from syncsvc.store.db import Database
from syncsvc.store.models import IdempotencyKey
from syncsvc.store.types import utcnow

IDEMPOTENCY_KEY_MAX_CHARS = 255
RESERVATION_TTL_S = 300
ANSWER_TTL = timedelta(hours=24)
ANSWER_MAX_CHARS = 256 * 1024
#: POSTs that change nothing (a plan preview): running one again is its replay, so no key
#: is kept for them.
READ_ONLY_POSTS = frozenset({"/v1/plans"})
_RESERVED = 0
_TOO_LARGE = json.dumps(
    {"replayed": True, "note": "the original answer was too large to keep; the request was done"}
)


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    status: int
    content_type: str | None
    body: str | None


def request_hash(method: str, path: str, body: bytes) -> str:
    """The same key is only the same request for the same method, path and body bytes."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _mismatch(key: str) -> Conflict:
    return Conflict(
        "this Idempotency-Key was used with another request",
        [ErrorDetail(("header", "Idempotency-Key"), f"{key!r} belongs to another request")],
    )


async def begin(
    db: Database, tenant_id: str, key: str, method: str, path: str, digest: str
) -> StoredAnswer | None:
    """The stored answer to replay, or None after reserving the key for this request."""
    async with db.session() as session, session.begin():
        row = await session.get(IdempotencyKey, (tenant_id, key))
        expired = utcnow() - ANSWER_TTL
        if row is not None and row.created_at < expired:
            # Forgotten, so the key may be used afresh; the workers prune the other expired
            # keys (service/retention.py), so a keyed POST writes nothing more here.
            await session.execute(
                delete(IdempotencyKey).where(
                    IdempotencyKey.tenant_id == tenant_id,
                    IdempotencyKey.key == key,
                    IdempotencyKey.created_at < expired,
                )
            )
            row = None
        if row is not None:
            if row.request_hash != digest:
                raise _mismatch(key)
            if row.status != _RESERVED:
                return StoredAnswer(
                    row.status, row.response.get("content_type"), row.response.get("body")
                )
            if row.created_at > utcnow() - timedelta(seconds=RESERVATION_TTL_S):
                raise Conflict(
                    "a request with this Idempotency-Key is still in progress",
                    [ErrorDetail(("header", "Idempotency-Key"), "in progress; retry later")],
                )
            row.created_at = utcnow()
            return None
    try:
        async with db.session() as session, session.begin():
            session.add(
                IdempotencyKey(
                    tenant_id=tenant_id,
                    key=key,
                    method=method,
                    path=path,
                    request_hash=digest,
                    status=_RESERVED,
                    response={},
                )
            )
    except IntegrityError as exc:
        raise Conflict(
            "a request with this Idempotency-Key is still in progress",
            [ErrorDetail(("header", "Idempotency-Key"), "in progress; retry later")],
        ) from exc
    return None


async def answer_within(
    session: AsyncSession,
    tenant_id: str,
    key: str,
    status: int,
    content_type: str | None,
    body: str | None,
) -> None:
    """Stores the answer in the caller's transaction, so the change and its replay commit
    together: a process that dies after the commit can no longer leave a done change whose key
    a retry would run again (a second batch)."""
    row = await session.get(IdempotencyKey, (tenant_id, key))
    if row is not None:
        row.status = status
        row.response = _kept(content_type, body)


def _kept(content_type: str | None, body: str | None) -> dict[str, Any]:
    if body is not None and len(body) > ANSWER_MAX_CHARS:
        return {"content_type": "application/json", "body": _TOO_LARGE}
    return {"content_type": content_type, "body": body}


async def finish(
    db: Database, tenant_id: str, key: str, status: int, content_type: str | None, body: str | None
) -> None:
    """Keeps a 2xx answer for replays."""
    response = _kept(content_type, body)
    async with db.session() as session, session.begin():
        row = await session.get(IdempotencyKey, (tenant_id, key))
        if row is not None:
            row.status = status
            row.response = response


async def release(db: Database, tenant_id: str, key: str) -> None:
    """Forgets a reservation whose request did not succeed."""
    async with db.session() as session, session.begin():
        await session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.tenant_id == tenant_id,
                IdempotencyKey.key == key,
                IdempotencyKey.status == _RESERVED,
            )
        )


async def forget_within(session: AsyncSession, tenant_id: str, key: str) -> None:
    """Forgets a key whose kept answer (a 202) named work that failed afterwards, in the
    caller's transaction: a retry with the same key then does the work afresh."""
    await session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key
        )
    )
