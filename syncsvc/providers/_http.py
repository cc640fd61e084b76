"""HTTP plumbing shared by the provider adapters: which CAs to trust, how long to wait, and
the one table from an HTTP status to the error tree (``error_for_status``).

The service trusts extra CAs only through the standard ``SSL_CERT_FILE`` /
``REQUESTS_CA_BUNDLE`` variables and hands that one bundle to every client it builds
(aiohttp, MSAL's requests session, httplib2), so a test CA or a corporate proxy CA works
the same everywhere.
"""

from __future__ import annotations

import email.utils
import math
import os
import ssl
import time
from collections.abc import Mapping
from pathlib import Path

from syncsvc.errors import (
    AuthFailed,
    Permanent,
    ProviderConflict,
    ProviderError,
    ProviderNotFound,
    Throttled,
    Transient,
)

CA_BUNDLE_ENV_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


def ca_bundle_path(environ: Mapping[str, str] | None = None) -> str | None:
    """The CA bundle named by ``SSL_CERT_FILE`` (first) or ``REQUESTS_CA_BUNDLE``, if it exists."""
    env = os.environ if environ is None else environ
    for name in CA_BUNDLE_ENV_VARS:
        value = env.get(name)
        if value and Path(value).is_file():
            return value
    return None


def ssl_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """A verifying client context trusting ``ca_bundle`` (default: :func:`ca_bundle_path`).

    Without a bundle it falls back to the platform's default CAs.
    """
    bundle = ca_bundle if ca_bundle is not None else ca_bundle_path()
    return ssl.create_default_context(cafile=bundle)


#: The longest wait a server may ask for: past it a hostile or broken ``Retry-After`` (say
#: 99999999999999) would park a mailbox for ever, or overflow a datetime.
RETRY_AFTER_MAX_S = 3600.0


def parse_retry_after(value: str | None, now_s: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), at most
    ``RETRY_AFTER_MAX_S``."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        current = time.time() if now_s is None else now_s
        return min(RETRY_AFTER_MAX_S, max(0.0, math.ceil(when.timestamp() - current)))
    return None if math.isnan(seconds) or seconds < 0 else min(seconds, RETRY_AFTER_MAX_S)


#: Every status with a meaning of its own, for all three providers, and what each really
#: sends with it. Unlisted: other 5xx are ``Transient``, other 4xx ``Permanent``.
STATUS_ERRORS: Mapping[int, type[ProviderError]] = {
    # Graph InvalidAuthenticationToken (after one token refresh); Google authError;
    # CalDAV a wrong password.
    401: AuthFailed,
    # Graph ErrorAccessDenied (no application access policy); Google forbidden,
    # insufficientPermissions (its rate-limit 403s are ``throttled``); CalDAV no write right.
    403: AuthFailed,
    # Graph ErrorItemNotFound; Google notFound; CalDAV no such resource.
    404: ProviderNotFound,
    # Graph and Google: deleted (Google ``GONE_STATUSES``); CalDAV gone.
    410: ProviderNotFound,
    # A server-side request timeout: the request may be sent again.
    408: Transient,
    # Graph ErrorIrresolvableConflict; Google duplicate (the event id is taken); CalDAV
    # "resource exists" (lock-related 409s are ``locked``).
    409: ProviderConflict,
    # If-Match / If-None-Match failed: Graph changeKey, Google etag, CalDAV etag.
    412: ProviderConflict,
    # Graph ErrorItemLocked / mailbox being moved; Xandikos and others on overlapping PUTs to
    # one collection (RFC 4918 §11.3): the lock goes away, so try again later.
    423: Transient,
    # Graph ApplicationThrottled / MailboxConcurrency (with Retry-After); Google
    # rateLimitExceeded; CalDAV servers behind a rate-limiting proxy.
    429: Throttled,
}
#: Statuses that mean "slow down" when the server says when to come back (Graph's 503/504
#: under load, CalDAV servers answering 503 with Retry-After).
THROTTLED_WITH_RETRY_AFTER = frozenset({503, 504})


def error_for_status(
    status: int,
    message: str,
    *,
    retry_after_s: float | None = None,
    throttled: bool = False,
    locked: bool = False,
) -> ProviderError:
    """The error for a failed answer, the same way for every provider.

    ``throttled``: the body says "rate limit" under a status that otherwise means something
    else (Google's 403 ``rateLimitExceeded`` / ``quotaExceeded``). ``locked``: the body of a
    409 names a lock (CalDAV servers refusing a concurrent write), which passes like a 423.
    """
    if throttled or (status in THROTTLED_WITH_RETRY_AFTER and retry_after_s is not None):
        return Throttled(message, retry_after_s)
    kind = STATUS_ERRORS.get(status, Transient if status >= 500 else Permanent)
    if locked and status == 409:
        kind = Transient
    if kind is Transient or kind is Throttled:
        return kind(message, retry_after_s)
    return kind(message)
