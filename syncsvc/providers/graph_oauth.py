"""The Microsoft side of a user connecting their own calendar: MSAL's authorization code flow
(MSAL adds PKCE and a nonce, and checks both), then a Graph client that reaches the user's
mailbox with *delegated* tokens refreshed from their refresh token.

Sign-in goes through the ``organizations`` authority (any directory's work or school account);
the grant remembers the user's own directory (``tid``), which later refreshes are taken in.
MSAL no longer checks ID tokens (msal 1.38), so the claims we rely on are checked here: the
token is for our app and names its directory and account. It came straight from the token
endpoint over TLS, so its signature is not checked (OpenID Connect Core 3.1.3.7).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msal
import requests

from syncsvc.config import Settings
from syncsvc.errors import AuthFailed, GrantRevoked, Transient
from syncsvc.providers._http import ca_bundle_path
from syncsvc.providers.graph import GRAPH_REQUEST_TIMEOUT_S, GraphClient, msal_app

USER_SCOPES = [
    "https://graph.microsoft.com/Calendars.ReadWrite",
    "https://graph.microsoft.com/MailboxSettings.Read",
]
SIGN_IN_AUTHORITY = "organizations"
#: Token errors that mean the user's grant is gone (revoked, expired, consent withdrawn).
#: Stores a user's rotated refresh token: told (the one it replaces, the new one).
RotatedHook = Callable[[str, str], Awaitable[None]]
_GRANT_GONE = frozenset({"invalid_grant", "interaction_required", "unauthorized_client"})


@dataclass(frozen=True, slots=True)
class GraphGrant:
    account: str  # the signed-in user's address (``preferred_username``)
    directory: str  # their Entra tenant (``tid``)
    refresh_token: str = field(repr=False)


def _sign_in_app(settings: Settings) -> msal.ConfidentialClientApplication:
    return msal_app(
        settings.graph_client_id or "",
        settings.graph_client_secret or "",
        f"{settings.graph_authority_url.rstrip('/')}/{SIGN_IN_AUTHORITY}",
        ca_bundle_path(),
        GRAPH_REQUEST_TIMEOUT_S,
    )


def authorization_url(
    settings: Settings, redirect_uri: str, state: str
) -> tuple[str, dict[str, Any]]:
    """The sign-in URL and MSAL's flow (its PKCE verifier and nonce: keep it secret), blocking."""
    try:
        flow: dict[str, Any] = _sign_in_app(settings).initiate_auth_code_flow(
            USER_SCOPES, redirect_uri=redirect_uri, state=state, prompt="select_account"
        )
    except (requests.RequestException, ValueError) as exc:
        raise Transient(f"Microsoft sign-in unavailable: {type(exc).__name__}") from exc
    return str(flow["auth_uri"]), flow


def exchange_code(settings: Settings, flow: dict[str, Any], answer: dict[str, str]) -> GraphGrant:
    """Trades the code Microsoft sent back for the user's refresh token (blocking)."""
    try:
        result = _sign_in_app(settings).acquire_token_by_auth_code_flow(flow, answer)
    except requests.RequestException as exc:
        raise Transient(f"Microsoft token endpoint unreachable: {type(exc).__name__}") from exc
    except ValueError as exc:  # MSAL: the state or the nonce does not match the flow
        raise AuthFailed(f"Microsoft's answer does not match the sign-in: {exc}") from exc
    if "error" in result:
        description = str(result.get("error_description") or "").split("\n")[0][:200]
        raise AuthFailed(f"Microsoft refused the code: {result['error']}: {description}")
    claims = result.get("id_token_claims") or {}
    account = str(claims.get("preferred_username") or "").strip().lower()
    directory = str(claims.get("tid") or "")
    if claims.get("aud") != settings.graph_client_id or not directory or "@" not in account:
        raise AuthFailed("Microsoft's ID token names no account of this app")
    if not result.get("refresh_token"):
        raise AuthFailed("Microsoft gave no refresh token (offline access was not granted)")
    return GraphGrant(account, directory, str(result["refresh_token"]))


@dataclass(slots=True)
class DelegatedGraphClient(GraphClient):
    """One user's Graph client: delegated tokens from their refresh token, in their directory.

    MSAL's cache keeps the access token and the newest (rotated) refresh token; the stored one
    is used only to start. A refused refresh is :class:`GrantRevoked`: only this user's
    operations wait until they connect again.
    """

    refresh_token: str = field(default="", repr=False)
    #: Told each rotated refresh token: Entra hands out a new one with every refresh, and the
    #: one stored at sign-in expires on its own (90 days) however often it is used.
    on_rotated: RotatedHook | None = field(default=None, repr=False)
    _force_refresh: bool = field(default=False, init=False, repr=False)
    #: Every refresh token this client started from or was handed (a new grant is not one).
    _known: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self._known.add(self.refresh_token)

    def regrant(self, refresh_token: str) -> None:
        """The user connected again: start over from their new grant (a token this client
        rotated to itself changes nothing)."""
        if refresh_token not in self._known:
            self._known.add(refresh_token)
            self.refresh_token, self._app = refresh_token, None

    async def token(self) -> str:
        token = await GraphClient.token(self)
        app = self._app
        cached = app.token_cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN) if app else ()
        first: dict[str, Any] = next(iter(cached), {})
        newest = str(first.get("secret") or "")
        if newest and newest not in self._known:
            self._known.add(newest)
            old, self.refresh_token = self.refresh_token, newest
            if self.on_rotated is not None:
                await self.on_rotated(old, newest)
        return token

    def _acquire(self) -> dict[str, Any]:
        if self._app is None:
            try:
                self._app = self._build_app()
            except ValueError as exc:
                raise AuthFailed(f"graph authority refused: {exc}") from exc
        app = self._app
        accounts = app.get_accounts()
        result: dict[str, Any] | None = None
        if accounts:
            result = app.acquire_token_silent_with_error(
                USER_SCOPES, accounts[0], force_refresh=self._force_refresh
            )
        if result is None:  # nothing cached yet: start from the stored refresh token
            result = app.acquire_token_by_refresh_token(self.refresh_token, USER_SCOPES)
        self._force_refresh = False
        error = str(result.get("error") or "")
        if error in _GRANT_GONE:
            self._app = None  # nothing cached may outlive the refusal
            description = str(result.get("error_description") or "").split("\n")[0][:300]
            raise GrantRevoked(f"the user's Microsoft grant was refused: {error}: {description}")
        return result

    def _drop_cached_token(self, app: msal.ConfidentialClientApplication) -> None:
        """Graph refused the access token: the next one is refreshed, not taken from cache."""
        self._force_refresh = True
