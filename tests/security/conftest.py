"""The API fixtures of ``tests/api`` (a served app per database kind, two tenants)."""

from tests.api.conftest import app, client, db, settings, tenants

__all__ = ["app", "client", "db", "settings", "tenants"]
