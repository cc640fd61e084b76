"""The dashboard's sign-in: the operator key as a bearer, or a session cookie.

The cookie holds a random token; the session is the token's HMAC, keyed from ``SECRET_KEY``
*and* the operator key (so changing either signs every operator out), kept in the guard until
it expires or its operator signs out, on every process at once. The cookie is HttpOnly and
SameSite=Strict (pages of other sites can neither read it nor make the browser send it), and
Secure when the public base URL is https.

Every comparison of a key goes through the guard's count of failed sign-ins, the bearer on
any dashboard route as much as the sign-in form: either would otherwise be a guessing oracle.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from urllib.parse import urlsplit

from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from syncsvc.api.middleware import bearer_key
from syncsvc.config import Settings
from syncsvc.dashboard.guard import GUARD, Guard, client_of
from syncsvc.errors import ErrorDetail, SyncSvcError

COOKIE_NAME = "syncsvc_dashboard"
COOKIE_PATH = "/dashboard"
SESSION_TTL_S = 12 * 3600
TOKEN_BYTES = 32
#: A cookie longer than any token we hand out is not looked up.
TOKEN_MAX_CHARS = 64
_PURPOSE = b"dashboard-session"


class TooManySignIns(SyncSvcError):
    """Too many wrong keys lately, from this address or from everywhere (HTTP 429)."""

    code = "too_many_sign_ins"
    http_status = 429

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(
            f"too many failed sign-ins: try again in {self.retry_after_s} seconds",
            [ErrorDetail(("header", "Retry-After"), f"{self.retry_after_s} seconds")],
        )


def _signing_key(settings: Settings) -> bytes | None:
    if not settings.operator_key:
        return None
    operator = hashlib.sha256(settings.operator_key.encode()).digest()
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"syncsvc", info=_PURPOSE + operator
    ).derive(settings.secret_key.encode())


def _session_id(key: bytes, token: str) -> str:
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()


def _guard(request: web.Request, settings: Settings) -> Guard:
    return request.app[GUARD]


def is_operator_key(settings: Settings, key: str) -> bool:
    """Constant-time; with no operator key configured nobody is an operator."""
    expected = settings.operator_key
    return bool(expected) and hmac.compare_digest(key.encode(), str(expected).encode())


async def check_key(request: web.Request, settings: Settings, key: str) -> bool:
    """Compares ``key`` unless its client has failed too often (``TooManySignIns``)."""
    guard, client = _guard(request, settings), client_of(request)
    wait_s = await guard.attempt(client)
    if wait_s > 0:
        raise TooManySignIns(wait_s)
    if not is_operator_key(settings, key):
        return False
    await guard.succeeded(client)
    return True


async def is_operator(request: web.Request, settings: Settings) -> bool:
    """The operator key as ``Authorization: Bearer``, or an open session's cookie."""
    key = bearer_key(request)
    if key is not None:
        return await check_key(request, settings, key)
    signing = _signing_key(settings)
    token = request.cookies.get(COOKIE_NAME, "")
    if signing is None or not 0 < len(token) <= TOKEN_MAX_CHARS:
        return False
    return await _guard(request, settings).has_session(_session_id(signing, token))


def _secure(request: web.Request, settings: Settings) -> bool:
    return request.secure or urlsplit(settings.public_base_url).scheme.lower() == "https"


async def sign_in(response: web.StreamResponse, request: web.Request, settings: Settings) -> None:
    """Opens a session and sets its cookie; call only after ``check_key``."""
    signing = _signing_key(settings)
    assert signing is not None
    token = secrets.token_urlsafe(TOKEN_BYTES)
    await _guard(request, settings).open_session(_session_id(signing, token), SESSION_TTL_S)
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=SESSION_TTL_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=_secure(request, settings),
    )


async def sign_out(response: web.StreamResponse, request: web.Request, settings: Settings) -> None:
    """Ends the cookie's session everywhere, so a copy of the cookie stops working too."""
    signing = _signing_key(settings)
    token = request.cookies.get(COOKIE_NAME, "")
    if signing is not None and 0 < len(token) <= TOKEN_MAX_CHARS:
        await _guard(request, settings).close_session(_session_id(signing, token))
    response.del_cookie(
        COOKIE_NAME,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=_secure(request, settings),
    )
