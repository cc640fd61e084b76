"""One tree of errors with a single root, so callers catch the level they care about.

Errors become HTTP answers in exactly one place (the API's error middleware); nothing below
the API knows about HTTP status codes except through ``http_status`` here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """Where (a path of field names and indexes) and what is wrong."""

    loc: tuple[str | int, ...]
    msg: str

    def as_json(self) -> dict[str, Any]:
        return {"loc": list(self.loc), "msg": self.msg}


class SyncSvcError(Exception):
    """Root of every error syncsvc raises on purpose."""

    code = "error"
    http_status = 500

    def __init__(self, message: str, details: Sequence[ErrorDetail] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = tuple(details)


class ValidationError(SyncSvcError):
    """Well-formed input whose meaning is wrong (HTTP 422)."""

    code = "validation_error"
    http_status = 422


class BadRequest(SyncSvcError):
    """Input that cannot be parsed at all (HTTP 400)."""

    code = "bad_request"
    http_status = 400


class Unauthorized(SyncSvcError):
    code = "unauthorized"
    http_status = 401


class Forbidden(SyncSvcError):
    code = "forbidden"
    http_status = 403


class NotFound(SyncSvcError):
    """Unknown id, or an id of another tenant: both answer 404 so tenants learn nothing."""

    code = "not_found"
    http_status = 404


class Conflict(SyncSvcError):
    """A conflict with stored state, e.g. an Idempotency-Key reused with another body."""

    code = "conflict"
    http_status = 409


class TooLarge(SyncSvcError):
    code = "too_large"
    http_status = 413


# --- Provider errors: what a calendar adapter raises, in one vocabulary for the queue. ---


class ProviderError(SyncSvcError):
    """A calendar provider refused or failed an operation."""

    code = "provider_error"
    http_status = 502


class Throttled(ProviderError):
    """The provider asked us to slow down; nothing is wrong with the operation itself."""

    code = "throttled"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ProviderNotFound(ProviderError):
    """The event (or calendar) does not exist (404/410): a delete of it is done."""

    code = "provider_not_found"


class ProviderConflict(ProviderError):
    """The resource exists already or changed under us (409/412)."""

    code = "provider_conflict"


class SyncTokenExpired(ProviderError):
    """The provider forgot our incremental-sync token (Graph delta 410, Google
    ``fullSyncRequired``): list from scratch."""

    code = "sync_token_expired"


class AuthFailed(ProviderError):
    """Credentials are missing, expired or lack permission: retrying will not help."""

    code = "auth_failed"


class ConsentRevoked(AuthFailed):
    """The organisation (or the user) no longer grants us access, e.g. the admin consent was
    removed: operations wait, not die, until access is granted again."""

    code = "consent_revoked"


class GrantRevoked(ConsentRevoked):
    """A user's own grant (their refresh token) was revoked or has expired: only their
    operations wait, until they connect again."""

    code = "grant_revoked"


class Transient(ProviderError):
    """A timeout, a connection error or a 5xx: worth retrying with backoff."""

    code = "transient"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unreachable(Transient):
    """The provider's server did not answer at all (refused, reset, timed out). The server is
    down, not the operation wrong: the mailbox waits, as when throttled, and the operation
    uses none of its attempts, so an outage longer than the backoff loses nothing."""

    code = "unreachable"


class Permanent(ProviderError):
    """The provider rejected the request for a reason retrying cannot fix."""

    code = "permanent"


class DatabaseUnavailable(SyncSvcError):
    """The database cannot be reached right now (restarting, down, a connection cut): the
    request did nothing durable and is worth repeating after ``retry_after_s``."""

    code = "database_unavailable"
    http_status = 503
    retry_after_s = 5
