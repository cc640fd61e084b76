"""Turns a user's stored calendar connection into a provider adapter.

The service layer reads the ``User`` row and decrypts its secret with the box; the provider
registry gets only the resulting plain ``Connection`` (providers stay below storage).
"""

from __future__ import annotations

from syncsvc.config import Settings
from syncsvc.errors import Permanent
from syncsvc.providers.base import CalendarProvider
from syncsvc.providers.registry import Connection, ProviderRegistry
from syncsvc.store.crypto import SecretBox
from syncsvc.store.models import User

#: The connection field naming the account, per provider.
ACCOUNT_FIELDS = {"graph": "mailbox", "google": "calendar_id", "caldav": "url"}


def connection_of(user: User, box: SecretBox) -> Connection:
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
    )


class UserProviders:
    """The workers' provider factory: a user's adapter, through one shared registry."""

    def __init__(self, settings: Settings, box: SecretBox) -> None:
        self.registry = ProviderRegistry(settings)
        self.box = box

    async def __call__(self, user: User) -> CalendarProvider:
        return self.registry(connection_of(user, self.box))

    async def aclose(self) -> None:
        await self.registry.aclose()
