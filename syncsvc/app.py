"""Builds the aiohttp application: typed state, middlewares, and every API module's routes.

No business rules here: handlers live in ``syncsvc/api/<resource>.py`` and call ``service``.
"""

from __future__ import annotations

import asyncio
import importlib
from importlib.metadata import PackageNotFoundError, version

from aiohttp import web

from syncsvc import tracing
from syncsvc.api import batches as batches_api
from syncsvc.api._framework import BODY_POOL, DB, METRICS, OPENAPI, SECRET_BOX, SETTINGS, Routes
from syncsvc.api._framework import openapi_document as _openapi_document
from syncsvc.api.bodies import BodyPool
from syncsvc.api.connections import PROVIDERS
from syncsvc.api.middleware import MIDDLEWARES
from syncsvc.api.plans import CALENDARS
from syncsvc.api.quota import QUOTA, MemoryQuota, RedisQuota
from syncsvc.config import Settings
from syncsvc.dashboard.guard import GUARD, new_guard
from syncsvc.metrics import Metrics
from syncsvc.providers import egress
from syncsvc.service.connections import UserProviders
from syncsvc.service.plans import CalendarBusy
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from webhooks.routes import routes as webhook_routes

#: Every ``syncsvc/api/<name>.py`` with a ``routes = Routes(...)`` table. Adding a resource is
#: adding its name here.
API_MODULES = (
    "health",
    "users",
    "plans",
    "batches",
    "activities",
    "feeds",
    "schedules",
    "tenant",
    "connections",
    "ops",
    "dashboard",
)
API_TITLE = "syncsvc"
#: The longest request line (method, path, query) parsed; aiohttp's 8 KiB default refuses,
#: outside our error envelope, URLs that the documented query limits allow once UTF-8 is
#: percent-encoded (a 1,000-character cursor of 4-byte characters is 12 KB).
REQUEST_LINE_MAX_BYTES = 64 * 1024


def api_routes() -> list[Routes]:
    tables: list[Routes] = []
    for name in API_MODULES:
        table = importlib.import_module(f"syncsvc.api.{name}").routes
        if not isinstance(table, Routes):
            raise TypeError(f"syncsvc.api.{name}.routes is not a Routes table")
        tables.append(table)
    tables.append(webhook_routes)  # top-level package ``webhooks/``, mounted like the API
    return tables


def build_app(settings: Settings, db: Database) -> web.Application:
    """The API application; the caller owns ``db`` (and closes it)."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[*tracing.middlewares(), *MIDDLEWARES],
        handler_args={"max_line_size": REQUEST_LINE_MAX_BYTES},
    )
    app[SETTINGS] = settings
    egress.install(settings.egress)
    app[DB] = db
    app[SECRET_BOX] = SecretBox(settings.secret_key, settings.secret_key_previous)
    app[METRICS] = Metrics()
    # avoid_busy reads calendars from the API process: its own adapters, closed with the app.
    registry = UserProviders(settings, app[SECRET_BOX], db)
    app[PROVIDERS] = registry
    app[CALENDARS] = CalendarBusy(registry)

    async def close_registry(_: web.Application) -> None:
        await registry.aclose()

    app.on_cleanup.append(close_registry)
    app[QUOTA] = RedisQuota.from_url(settings.redis_url) if settings.redis_url else MemoryQuota()
    app[GUARD] = new_guard(settings.redis_url)
    app[BODY_POOL] = BodyPool(settings.api_parse_processes)

    async def close_stores(app: web.Application) -> None:
        await app[QUOTA].aclose()
        await app[GUARD].aclose()
        await asyncio.to_thread(app[BODY_POOL].close)

    app.on_cleanup.append(close_stores)
    app[batches_api.COMMITS] = set()
    app.on_startup.append(batches_api.recover_commits)
    app.on_shutdown.append(batches_api.stop_commits)
    endpoints = [ep for table in api_routes() for ep in table.endpoints]
    for ep in endpoints:
        app.router.add_route(ep.method, ep.path, ep.handle)
    app[OPENAPI] = _openapi_document(endpoints, title=API_TITLE, version=_version())
    return app


def _version() -> str:
    try:
        return version("syncsvc")
    except PackageNotFoundError:
        return "0.0.0"
