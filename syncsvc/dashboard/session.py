"""The dashboard's sign-in: the operator key as a bearer, or a signed session cookie.

The cookie holds only an expiry and its HMAC, keyed from ``SECRET_KEY`` *and* the operator
key, so changing either signs every operator out. It is HttpOnly and SameSite=Strict: pages
of other sites can neither read it nor make the browser send it.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from syncsvc.api.middleware import bearer_key
from syncsvc.config import Settings

COOKIE_NAME = "syncsvc_dashboard"
COOKIE_PATH = "/dashboard"
SESSION_TTL_S = 12 * 3600
_PURPOSE = b"dashboard-session"


def _signing_key(settings: Settings) -> bytes | None:
    if not settings.operator_key:
        return None
    operator = hashlib.sha256(settings.operator_key.encode()).digest()
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"syncsvc", info=_PURPOSE + operator
    ).derive(settings.secret_key.encode())


def _mac(key: bytes, expires: int) -> str:
    return hmac.new(key, f"{_PURPOSE.decode()}:{expires}".encode(), hashlib.sha256).hexdigest()


def is_operator_key(settings: Settings, key: str) -> bool:
    """Constant-time; with no operator key configured nobody is an operator."""
    expected = settings.operator_key
    return bool(expected) and hmac.compare_digest(key.encode(), str(expected).encode())


def _valid_cookie(settings: Settings, value: str, now_s: float) -> bool:
    key = _signing_key(settings)
    expires_text, _, mac = value.partition(".")
    if key is None or not expires_text.isdigit() or len(expires_text) > 12:
        return False
    expires = int(expires_text)
    return expires > now_s and hmac.compare_digest(mac, _mac(key, expires))


def is_operator(request: web.Request, settings: Settings) -> bool:
    """The operator key as ``Authorization: Bearer``, or a valid session cookie."""
    key = bearer_key(request)
    if key is not None:
        return is_operator_key(settings, key)
    cookie = request.cookies.get(COOKIE_NAME)
    return cookie is not None and _valid_cookie(settings, cookie, time.time())


def sign_in(response: web.StreamResponse, request: web.Request, settings: Settings) -> None:
    """Sets the session cookie; call only after checking the operator key."""
    key = _signing_key(settings)
    assert key is not None
    expires = int(time.time()) + SESSION_TTL_S
    response.set_cookie(
        COOKIE_NAME,
        f"{expires}.{_mac(key, expires)}",
        max_age=SESSION_TTL_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=request.secure or settings.public_base_url.startswith("https://"),
    )


def sign_out(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE_NAME, path=COOKIE_PATH)
