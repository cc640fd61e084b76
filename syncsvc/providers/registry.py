"""Builds the right ``CalendarProvider`` for a calendar connection.

One registry per worker process: it owns the shared clients (one aiohttp session for CalDAV,
one MSAL app for Graph) and keeps one adapter per connection, so tokens and connections are
reused across operations. It takes a plain ``Connection`` built by the service layer
(``service/connections.py``) — decrypted credentials included — so providers stay below
storage and never see a database row or the secret box.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from syncsvc.config import Settings
from syncsvc.errors import AuthFailed, Permanent
from syncsvc.providers._http import ssl_context
from syncsvc.providers.base import CalendarProvider
from syncsvc.providers.caldav import CalDAVProvider
from syncsvc.providers.egress import GuardedConnector
from syncsvc.providers.google import GoogleProvider
from syncsvc.providers.graph import GraphClient


@dataclass(frozen=True, slots=True)
class Connection:
    """One calendar connection: whose it is, which account, and the credentials to reach it."""

    tenant_id: str
    provider: str  # "graph" | "google" | "caldav" | "none"
    #: The mailbox (Graph), calendar id (Google) or collection URL (CalDAV).
    account: str
    timezone: str
    #: Non-secret settings (CalDAV ``username``).
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: Decrypted secrets (CalDAV ``password``, Google ``oauth``).
    credentials: Mapping[str, Any] = field(default_factory=dict)


class ProviderRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._providers: dict[str, CalendarProvider] = {}
        self._session: aiohttp.ClientSession | None = None
        self._graph: GraphClient | None = None

    def __call__(self, connection: Connection) -> CalendarProvider:
        # The connection as given: a corrected password or a new calendar builds a new adapter.
        cache_key = repr(connection)
        provider = self._providers.get(cache_key)
        if provider is None:
            provider = self._build(connection)
            self._providers[cache_key] = provider
        return provider

    def _build(self, c: Connection) -> CalendarProvider:
        if c.provider == "caldav":
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    connector=GuardedConnector(self.settings.egress, ssl=ssl_context())
                )
            return CalDAVProvider(
                c.account,
                str(c.settings.get("username", "")),
                str(c.credentials.get("password", "")),
                self._session,
            )
        if c.provider == "graph":
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
            return self._graph.mailbox(c.account, c.timezone)
        if c.provider == "google":
            oauth = c.credentials.get("oauth")
            if isinstance(oauth, dict):
                return GoogleProvider.with_user_oauth(
                    self.settings,
                    c.account,
                    refresh_token=str(oauth["refresh_token"]),
                    client_id=str(oauth["client_id"]),
                    client_secret=str(oauth["client_secret"]),
                )
            # Delegation impersonates the calendar's own address, which mailbox ownership
            # checked, never the free ``email`` field a tenant may set to anyone.
            return GoogleProvider.with_service_account(
                self.settings, c.account, calendar_id=c.account
            )
        raise Permanent(f"no calendar connection ({c.provider})")

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        self._providers.clear()
        if self._graph is not None:
            await self._graph.aclose()
        if self._session is not None:
            await self._session.close()
