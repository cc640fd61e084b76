"""HTTP plumbing shared by the provider adapters: which CAs to trust, how long to wait.

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


def parse_retry_after(value: str | None, now_s: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
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
        return max(0.0, math.ceil(when.timestamp() - current))
    return seconds if seconds >= 0 and math.isfinite(seconds) else None
