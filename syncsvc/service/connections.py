"""Turns a user's stored calendar connection into a provider adapter.

The service layer reads the ``User`` row, decrypts its secret with the box and looks up the
tenant's Microsoft 365 directory; the provider registry gets only the resulting plain
``Connection`` (providers stay below storage).
"""

from __future__ import annotations

import time

from syncsvc.config import Settings
from syncsvc.errors import Permanent
from syncsvc.providers.base import CalendarProvider
from syncsvc.providers.registry import Connection, ProviderRegistry
from syncsvc.service.tenant_connections import graph_directory
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import User

#: The connection field naming the account, per provider.
ACCOUNT_FIELDS = {"graph": "mailbox", "google": "calendar_id", "caldav": "url"}
#: How long a tenant's directory is remembered: a new consent is picked up within this.
DIRECTORY_TTL_S = 30.0


def connection_of(user: User, box: SecretBox, directory: str | None = None) -> Connection:
    config = user.calendar_config
    name = ACCOUNT_FIELDS.get(user.calendar_provider)
    if name is None or not config.get(name):
        raise Permanent(f"user {user.id} has no calendar connection ({user.calendar_provider})")
    return Connection(
        tenant_id=user.tenant_id,
        provider=user.calendar_provider,
        account=str(config[name]),
        timezone=user.timezone,
        settings={k: v for k, v in config.items() if k != name},
        credentials=box.decrypt(user.calendar_secret) if user.calendar_secret else {},
        directory=directory,
    )


class UserProviders:
    """The provider factory of a process: a user's adapter, through one shared registry."""

    def __init__(self, settings: Settings, box: SecretBox, db: Database) -> None:
        self.registry = ProviderRegistry(settings)
        self.box = box
        self.db = db
        self._directories: dict[str, tuple[float, str | None]] = {}

    async def __call__(self, user: User) -> CalendarProvider:
        directory = None
        if user.calendar_provider == "graph":
            directory = await self.directory(user.tenant_id)
        return self.registry(connection_of(user, self.box, directory))

    async def directory(self, tenant_id: str) -> str | None:
        """The tenant's consented Entra tenant, cached for ``DIRECTORY_TTL_S``."""
        cached = self._directories.get(tenant_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        async with self.db.session() as s:
            directory = await graph_directory(s, tenant_id)
        self._directories[tenant_id] = (time.monotonic() + DIRECTORY_TTL_S, directory)
        return directory

    async def verified_domains(self, directory: str) -> list[str]:
        """The directory's verified domains, read with an app token of that directory (by a
        client of its own: a refusal here is not remembered by the clients that sync)."""
        client = self.registry.new_graph(directory)
        try:
            return await client.verified_domains()
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        await self.registry.aclose()
