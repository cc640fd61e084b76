"""Builds the right ``CalendarProvider`` for a user's stored calendar connection.

One registry per worker process: it owns the shared clients (one aiohttp session for CalDAV,
one MSAL app for Graph) and keeps one adapter per calendar, so tokens and connections are
reused across operations.
"""

from __future__ import annotations

import aiohttp

from syncsvc.config import Settings
from syncsvc.errors import AuthFailed, Permanent
from syncsvc.providers._http import ssl_context
from syncsvc.providers.base import CalendarProvider
from syncsvc.providers.caldav import CalDAVProvider
from syncsvc.providers.google import GoogleProvider
from syncsvc.providers.graph import GraphClient
from syncsvc.store.crypto import SecretBox
from syncsvc.store.models import User


class ProviderRegistry:
    def __init__(self, settings: Settings, box: SecretBox) -> None:
        self.settings = settings
        self.box = box
        self._providers: dict[tuple[str, str, str, str], CalendarProvider] = {}
        self._session: aiohttp.ClientSession | None = None
        self._graph: GraphClient | None = None

    async def __call__(self, user: User) -> CalendarProvider:
        # The connection as stored (settings and encrypted secret): a corrected password or a
        # new calendar builds a new adapter.
        connection = repr(sorted(user.calendar_config.items())) + repr(user.calendar_secret)
        cache_key = (user.tenant_id, user.id, user.calendar_provider, connection)
        provider = self._providers.get(cache_key)
        if provider is None:
            provider = self._build(user)
            self._providers[cache_key] = provider
        return provider

    def _secret(self, user: User) -> dict[str, object]:
        return self.box.decrypt(user.calendar_secret) if user.calendar_secret else {}

    def _build(self, user: User) -> CalendarProvider:
        config = user.calendar_config
        if user.calendar_provider == "caldav":
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=ssl_context())
                )
            return CalDAVProvider(
                str(config["url"]),
                str(config.get("username", "")),
                str(self._secret(user).get("password", "")),
                self._session,
            )
        if user.calendar_provider == "graph":
            s = self.settings
            if not (s.graph_client_id and s.graph_client_secret and s.graph_tenant_id):
                raise AuthFailed("Microsoft Graph is not configured (SYNCSVC_GRAPH_CLIENT_ID, …)")
            if self._graph is None:
                self._graph = GraphClient(
                    tenant_id=s.graph_tenant_id,
                    client_id=s.graph_client_id,
                    client_secret=s.graph_client_secret,
                    api_url=s.graph_api_url,
                    authority_url=s.graph_authority_url,
                )
            return self._graph.mailbox(str(config["mailbox"]), user.timezone)
        if user.calendar_provider == "google":
            oauth = self._secret(user).get("oauth")
            if isinstance(oauth, dict):
                return GoogleProvider.with_user_oauth(
                    self.settings,
                    str(config["calendar_id"]),
                    refresh_token=str(oauth["refresh_token"]),
                    client_id=str(oauth["client_id"]),
                    client_secret=str(oauth["client_secret"]),
                )
            return GoogleProvider.with_service_account(
                self.settings,
                user.email or str(config["calendar_id"]),
                calendar_id=str(config["calendar_id"]),
            )
        raise Permanent(f"user {user.id} has no calendar connection ({user.calendar_provider})")

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        self._providers.clear()
        if self._graph is not None:
            await self._graph.aclose()
        if self._session is not None:
            await self._session.close()
