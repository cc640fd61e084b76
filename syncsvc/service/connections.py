"""Turns a user's stored calendar connection into a provider adapter.

The service layer reads the ``User`` row, decrypts its secret with the box and looks up the
tenant's Microsoft 365 directory; the provider registry gets only the resulting plain
``Connection`` (providers stay below storage).
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from syncsvc.config import Settings
from syncsvc.errors import ConsentRevoked, GrantRevoked, Permanent
from syncsvc.providers.base import CalendarProvider
from syncsvc.providers.registry import Connection, ProviderRegistry
from syncsvc.queue.outbox import CALENDAR_KEY_BY_PROVIDER
from syncsvc.service import user_connect
from syncsvc.service.tenant_connections import TenantLinks, reconnect_needed, tenant_links
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import User

log = logging.getLogger("syncsvc.connections")

#: How long a tenant's connections are remembered: a new consent or key is used within this.
LINKS_TTL_S = 30.0


def connection_of(user: User, box: SecretBox, links: TenantLinks | None = None) -> Connection:
    config = user.calendar_config
    name = CALENDAR_KEY_BY_PROVIDER.get(user.calendar_provider)
    if name is None or not config.get(name):
        raise Permanent(f"user {user.id} has no calendar connection ({user.calendar_provider})")
    links = links or TenantLinks()
    credentials = box.decrypt(user.calendar_secret) if user.calendar_secret else {}
    if user.calendar_provider == "google" and "oauth" not in credentials and links.google_key:
        credentials["service_account"] = links.google_key
    return Connection(
        tenant_id=user.tenant_id,
        provider=user.calendar_provider,
        account=str(config[name]),
        timezone=user.timezone,
        settings={k: v for k, v in config.items() if k != name},
        credentials=credentials,
        directory=links.directory if user.calendar_provider == "graph" else None,
    )


async def access_revoked(db: Database, tenant_id: str, mailbox: str, exc: ConsentRevoked) -> None:
    """A worker found access to ``mailbox`` withdrawn: the user's own grant (only their
    connection needs them to sign in again) or the tenant's organisation-wide consent."""
    provider, _, account = mailbox.partition(":")
    error = f"{exc.code}: {exc}"
    if isinstance(exc, GrantRevoked):
        await user_connect.grant_revoked(db, tenant_id, provider, account, error)
    else:
        await reconnect_needed(db, tenant_id, provider, error)


class UserProviders:
    """The provider factory of a process: a user's adapter, through one shared registry."""

    def __init__(self, settings: Settings, box: SecretBox, db: Database) -> None:
        self.registry = ProviderRegistry(settings, on_rotated=self._store_rotated)
        self.box = box
        self.db = db
        self._links: dict[str, tuple[float, TenantLinks]] = {}

    async def __call__(self, user: User) -> CalendarProvider:
        links = None
        if user.calendar_provider in ("graph", "google"):
            links = await self.links(user.tenant_id)
        return self.registry(connection_of(user, self.box, links))

    async def _store_rotated(self, connection: Connection, old: str, new: str) -> None:
        """Keeps a user's newest Microsoft refresh token (encrypted), so a restart does not
        fall back to the one from sign-in, which expires; a grant replaced meanwhile (the user
        connected again) is left alone."""
        try:
            async with self.db.session() as s, s.begin():
                users = await s.scalars(
                    select(User)
                    .where(
                        User.tenant_id == connection.tenant_id,
                        User.calendar_provider == "graph",
                        User.calendar_config["mailbox"].as_string() == connection.account,
                    )
                    .with_for_update()
                )
                for user in users:
                    secret = self.box.decrypt(user.calendar_secret) if user.calendar_secret else {}
                    oauth = secret.get("oauth")
                    if isinstance(oauth, dict) and oauth.get("refresh_token") == old:
                        oauth["refresh_token"] = new
                        user.calendar_secret = self.box.encrypt(secret)
        except SQLAlchemyError as exc:  # the token works; the next rotation stores its successor
            log.warning("graph.refresh_token.unsaved account=%s error=%s", connection.account, exc)

    async def links(self, tenant_id: str) -> TenantLinks:
        """The tenant's Entra tenant and Google key, cached for ``LINKS_TTL_S``."""
        cached = self._links.get(tenant_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        async with self.db.session() as s:
            links = await tenant_links(s, self.box, tenant_id)
        self._links[tenant_id] = (time.monotonic() + LINKS_TTL_S, links)
        return links

    async def verified_domains(self, directory: str) -> list[str]:
        """The directory's verified domains, read with an app token of that directory (by a
        client of its own: a refusal here is not remembered by the clients that sync)."""
        client = self.registry.new_graph(directory)
        try:
            return await client.verified_domains()
        finally:
            await client.aclose()

    async def discover_caldav(self, url: str, username: str, password: str) -> str:
        return await self.registry.discover_caldav(url, username, password)

    async def aclose(self) -> None:
        await self.registry.aclose()
