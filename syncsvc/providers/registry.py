"""Builds the right ``CalendarProvider`` for a calendar connection.

One registry per worker process: it owns the shared clients (one aiohttp session for CalDAV,
one MSAL app per Entra tenant for Graph) and keeps one adapter per connection, so tokens and
connections are reused across operations. It takes a plain ``Connection`` built by the service layer
(``service/connections.py``) — decrypted credentials included — so providers stay below
storage and never see a database row or the secret box.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
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
from syncsvc.providers.graph import GraphClient, GraphProvider
from syncsvc.providers.graph_oauth import DelegatedGraphClient


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
    #: Decrypted secrets (CalDAV ``password``, a user's own grant as ``oauth``, or the
    #: tenant's Google ``service_account`` key).
    credentials: Mapping[str, Any] = field(default_factory=dict)
    #: Graph: the Entra tenant the tenant's admin consented in (``None``: the install's
    #: ``SYNCSVC_GRAPH_TENANT_ID``, if set).
    directory: str | None = None


#: Stores the rotated refresh token of a connection that is a user's own Microsoft grant.
RotatedHook = Callable[[Connection, str, str], Awaitable[None]]


class ProviderRegistry:
    def __init__(self, settings: Settings, on_rotated: RotatedHook | None = None) -> None:
        self.settings = settings
        self.on_rotated = on_rotated
        self._providers: dict[str, CalendarProvider] = {}
        #: A user's own Microsoft grant, keyed without its refresh token, which rotates.
        self._delegated: dict[tuple[str, str, str, str], GraphProvider] = {}
        self._session: aiohttp.ClientSession | None = None
        #: One app-token client per Entra tenant: a directory's token never reaches another's.
        self._graph: dict[str, GraphClient] = {}

    def __call__(self, connection: Connection) -> CalendarProvider:
        oauth = connection.credentials.get("oauth")
        if connection.provider == "graph" and isinstance(oauth, dict):
            return self._delegated_mailbox(connection, oauth)
        # The connection as given: a corrected password or a new calendar builds a new adapter.
        cache_key = repr(connection)
        provider = self._providers.get(cache_key)
        if provider is None:
            provider = self._build(connection)
            self._providers[cache_key] = provider
        return provider

    def _caldav_session(self) -> aiohttp.ClientSession:
        """The one session of every CalDAV request, through the egress policy."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=GuardedConnector(self.settings.egress, ssl=ssl_context())
            )
        return self._session

    async def discover_caldav(self, url: str, username: str, password: str) -> str:
        """The calendar collection found from a CalDAV server URL (``CalDAVProvider.discover``)."""
        return await CalDAVProvider(url, username, password, self._caldav_session()).discover()

    def _build(self, c: Connection) -> CalendarProvider:
        if c.provider == "caldav":
            return CalDAVProvider(
                c.account,
                str(c.settings.get("username", "")),
                str(c.credentials.get("password", "")),
                self._caldav_session(),
            )
        if c.provider == "graph":
            return self.graph(c.directory).mailbox(c.account, c.timezone)
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
            # checked, never the free ``email`` field a tenant may set to anyone; with the
            # tenant's own service account if it gave one, else the install's.
            key = c.credentials.get("service_account")
            return GoogleProvider.with_service_account(
                self.settings,
                c.account,
                calendar_id=c.account,
                info=key if isinstance(key, dict) else None,
            )
        raise Permanent(f"no calendar connection ({c.provider})")

    def graph(self, directory: str | None) -> GraphClient:
        """The app-token client of one Entra tenant (``None``: the install's default)."""
        s = self.settings
        if not (s.graph_client_id and s.graph_client_secret):
            raise AuthFailed("Microsoft Graph is not configured (SYNCSVC_GRAPH_CLIENT_ID, …)")
        directory = directory or s.graph_tenant_id
        if not directory:
            raise AuthFailed(
                "the tenant has not connected Microsoft 365 (POST /v1/tenant/connections/graph)"
            )
        client = self._graph.get(directory)
        if client is None:
            client = self._graph[directory] = self.new_graph(directory)
        return client

    def _delegated_mailbox(self, c: Connection, oauth: Mapping[str, Any]) -> GraphProvider:
        """The user's own grant: a client of its own, kept across refresh-token rotations
        and handed the new grant when the user connects again."""
        directory, refresh_token = str(oauth["directory"]), str(oauth["refresh_token"])
        key = (c.tenant_id, c.account, c.timezone, directory)
        provider = self._delegated.get(key)
        if provider is not None:
            assert isinstance(provider.client, DelegatedGraphClient)
            provider.client.regrant(refresh_token)
            return provider
        s = self.settings
        if not (s.graph_client_id and s.graph_client_secret):
            raise AuthFailed("Microsoft Graph is not configured (SYNCSVC_GRAPH_CLIENT_ID, …)")
        hook, on_rotated = self.on_rotated, None
        if hook is not None:

            async def on_rotated(old: str, new: str) -> None:
                await hook(c, old, new)

        client = DelegatedGraphClient(
            tenant_id=directory,
            client_id=s.graph_client_id,
            client_secret=s.graph_client_secret,
            api_url=s.graph_api_url,
            authority_url=s.graph_authority_url,
            refresh_token=refresh_token,
            on_rotated=on_rotated,
        )
        provider = self._delegated[key] = GraphProvider(
            client, c.account, c.timezone, owns_client=True
        )
        return provider

    def new_graph(self, directory: str) -> GraphClient:
        """A client of its own (the caller closes it): MSAL remembers a refused token request
        for a minute, which must not outlive a consent check that failed."""
        s = self.settings
        return GraphClient(
            tenant_id=directory,
            client_id=s.graph_client_id or "",
            client_secret=s.graph_client_secret or "",
            api_url=s.graph_api_url,
            authority_url=s.graph_authority_url,
        )

    async def aclose(self) -> None:
        for provider in [*self._providers.values(), *self._delegated.values()]:
            await provider.aclose()
        self._providers.clear()
        self._delegated.clear()
        for client in self._graph.values():
            await client.aclose()
        self._graph.clear()
        if self._session is not None:
            await self._session.close()
