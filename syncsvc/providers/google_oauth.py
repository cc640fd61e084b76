"""The Google side of a user connecting their own calendar: the authorization code flow with
PKCE, through google-auth-oauthlib's ``Flow``. The ID token from the token endpoint names the
account that signed in; it came straight from Google over TLS, so its claims are read without
checking the signature (OpenID Connect Core 3.1.3.7)."""

from __future__ import annotations

from dataclasses import dataclass

import requests
from google.auth import jwt as google_jwt
from google_auth_oauthlib.flow import Flow
from oauthlib.oauth2.rfc6749.errors import OAuth2Error

from syncsvc.config import Settings
from syncsvc.errors import AuthFailed, Transient
from syncsvc.providers.google import CALENDAR_SCOPE

SCOPES = [CALENDAR_SCOPE, "openid", "email"]


@dataclass(frozen=True, slots=True)
class GoogleGrant:
    email: str
    refresh_token: str = ""


def _flow(settings: Settings, redirect_uri: str, code_verifier: str | None = None) -> Flow:
    config = {
        "web": {
            "client_id": settings.google_client_id,
            "client_secret": settings.google_client_secret,
            "auth_uri": settings.google_auth_url,
            "token_uri": settings.google_token_url,
            "redirect_uris": [redirect_uri],
        }
    }
    return Flow.from_client_config(
        config,
        scopes=SCOPES,
        redirect_uri=redirect_uri,
        code_verifier=code_verifier,
        autogenerate_code_verifier=code_verifier is None,
    )


def authorization_url(settings: Settings, redirect_uri: str, state: str) -> tuple[str, str]:
    """The consent URL (offline access: a refresh token) and the PKCE code verifier."""
    flow = _flow(settings, redirect_uri)
    url, _ = flow.authorization_url(state=state, access_type="offline", prompt="consent")
    return str(url), str(flow.code_verifier)


def exchange_code(settings: Settings, redirect_uri: str, code: str, verifier: str) -> GoogleGrant:
    """Trades the code for a refresh token and the signed-in address (blocking)."""
    flow = _flow(settings, redirect_uri, verifier)
    try:
        flow.fetch_token(code=code)
    except OAuth2Error as exc:
        raise AuthFailed(f"Google refused the code: {exc.error}") from exc
    except requests.RequestException as exc:
        raise Transient(f"Google token endpoint unreachable: {type(exc).__name__}") from exc
    credentials = flow.credentials
    claims = google_jwt.decode(credentials.id_token or "", verify=False)  # type: ignore[no-untyped-call]
    email = str(claims.get("email") or "").lower()
    if not email or claims.get("email_verified") is False:
        raise AuthFailed("Google named no verified address for the account")
    if not credentials.refresh_token:
        raise AuthFailed("Google gave no refresh token (offline access was not granted)")
    return GoogleGrant(email, credentials.refresh_token)
