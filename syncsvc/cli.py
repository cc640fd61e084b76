"""The ``syncsvc`` command: serve | api | worker | migrate | rotate-keys | tenants.

Every command brings the schema up to date first, so a fresh database needs no extra step
and several processes starting together are fine (see ``store/migrate.py``). Output meant
for scripts goes to stdout (the new key is the last line of ``tenants create``); everything
else goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy.exc import DBAPIError

from syncsvc import logs, tracing
from syncsvc.config import ConfigError, Settings
from syncsvc.errors import SyncSvcError
from syncsvc.service import keys
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database, is_unavailable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
log = logging.getLogger("syncsvc")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="syncsvc",
        description="Calendar sync for CRMs. Configured by SYNCSVC_* environment variables.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="API, workers and scheduler in one process")
    api = commands.add_parser("api", help="the HTTP API only (run workers apart)")
    for sub in (serve, api):
        sub.add_argument("--host", help="address to listen on (default SYNCSVC_HOST)")
        sub.add_argument("--port", type=int, help="port to listen on (default SYNCSVC_PORT)")
    commands.add_parser("worker", help="sync workers only")
    commands.add_parser("migrate", help="bring the database schema up to date")
    commands.add_parser(
        "rotate-keys",
        help="re-encrypt every stored secret with SYNCSVC_SECRET_KEY (the old key in "
        "SYNCSVC_SECRET_KEY_PREVIOUS)",
    )
    tenants = commands.add_parser("tenants", help="manage tenants")
    tenant_commands = tenants.add_subparsers(dest="tenants_command", required=True)
    create = tenant_commands.add_parser("create", help="create a tenant and print its API key")
    create.add_argument("name")
    domains = tenant_commands.add_parser("domains", help="the domains a tenant's connection covers")
    domain_commands = domains.add_subparsers(dest="domains_command", required=True)
    add = domain_commands.add_parser("add", help="the tenant's mailboxes may be in this domain")
    add.add_argument("tenant", help="tenant id (ten_…)")
    add.add_argument("domain")
    add.add_argument("--provider", choices=("google", "graph"), default="google")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        db = Database(settings.database_url)
    except SyncSvcError as exc:
        _print_error(exc)
        return EXIT_USAGE
    if args.command in ("serve", "api", "worker"):
        logs.configure(settings.log_format)
        try:
            tracing.configure_from_env()
        except ValueError as exc:
            print(f"syncsvc: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if settings.uses_dev_secret:
            host = getattr(args, "host", None) or settings.host
            if args.command != "serve" or not _loopback(host):
                print(
                    f"syncsvc: SYNCSVC_SECRET_KEY is not set: the built-in development key is "
                    f"public, so `{args.command}` will only use it for `serve` on a loopback "
                    "address; set a key of at least 32 characters",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            log.warning(
                "SYNCSVC_SECRET_KEY is not set: using the built-in development key; "
                "set your own for anything but a trial on this machine"
            )
    if args.command == "rotate-keys" and not settings.secret_key_previous:
        print(
            "syncsvc: rotate-keys needs the old key in SYNCSVC_SECRET_KEY_PREVIOUS "
            "and the new one in SYNCSVC_SECRET_KEY",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return asyncio.run(_run(args, settings, db))
    except SyncSvcError as exc:
        _print_error(exc)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED
    except (OSError, DBAPIError) as exc:
        # E.g. the port is taken, or the database went away: no traceback needed to see why.
        print(f"syncsvc: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _run(args: argparse.Namespace, settings: Settings, db: Database) -> int:
    try:
        if args.command in ("serve", "api", "worker"):
            await _migrate_when_up(db)
        else:
            try:
                await db.migrate()
            except (OSError, DBAPIError) as exc:
                raise SyncSvcError(f"cannot bring the database up to date: {exc}") from exc
        if args.command == "migrate":
            print("database schema is up to date")
            return EXIT_OK
        if args.command == "rotate-keys":
            box = SecretBox(settings.secret_key, settings.secret_key_previous)
            count = await keys.rotate_all(db, box)
            print(f"re-encrypted {count} stored secrets; SYNCSVC_SECRET_KEY_PREVIOUS may go")
            return EXIT_OK
        if args.command == "tenants" and args.tenants_command == "domains":
            return await _domains_add(db, args.tenant, args.provider, args.domain)
        if args.command == "tenants":
            return await _tenants_create(
                db, args.name, SecretBox(settings.secret_key, settings.secret_key_previous)
            )
        host: str = getattr(args, "host", None) or settings.host
        port: int = settings.port if getattr(args, "port", None) is None else args.port
        if args.command == "serve":
            await _serve(settings, db, host, port, with_workers=True)
        elif args.command == "api":
            await _serve(settings, db, host, port, with_workers=False)
        else:
            await _until_stopped(lambda stop: _workers(settings, db, stop))
        return EXIT_OK
    finally:
        await db.aclose()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _migrate_when_up(db: Database) -> None:
    """Long-running commands started while the database is down (or restarting) wait for it
    with backoff, saying so once, instead of exiting; SIGTERM/SIGINT still end the wait."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        while True:
            try:
                await db.migrate()
                db.outage.up()
                return
            except Exception as exc:
                if not is_unavailable(exc):
                    raise
                db.outage.down(exc)
            if not await db.wait_until_up(stop):
                raise KeyboardInterrupt
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _tenants_create(db: Database, name: str, box: SecretBox) -> int:
    from syncsvc.service.tenants import create_tenant_with_secret

    tenant, key, signing_secret = await create_tenant_with_secret(db, name, box)
    print(f"created tenant {tenant.name} ({tenant.id}).")
    print("Its callback signing secret (Standard Webhooks), shown only now:")
    print(signing_secret)
    print("Its API key, shown only now:")
    print(key)
    return EXIT_OK


async def _domains_add(db: Database, tenant_id: str, provider: str, domain: str) -> int:
    from syncsvc.service.mailboxes import add_domain

    async with db.session() as session, session.begin():
        await add_domain(session, tenant_id, provider, domain)
    print(f"tenant {tenant_id}: {provider} mailboxes may be in {domain.strip().lower()}")
    return EXIT_OK


async def _serve(
    settings: Settings, db: Database, host: str, port: int, *, with_workers: bool
) -> None:
    from aiohttp import web

    from syncsvc.app import build_app
    from syncsvc.quiet_gc import collect_when_quiet

    if with_workers:
        from syncsvc.service.tenants import DEV_TENANT_NAME, ensure_dev_tenant

        key = await ensure_dev_tenant(db)
        if key is not None:
            print(f"created tenant {DEV_TENANT_NAME}; its API key, shown only now:")
            print(key, flush=True)

    async def run(stop: asyncio.Event) -> None:
        # The app logs every request itself (event=http.request); no second access log.
        runner = web.AppRunner(build_app(settings, db), access_log=None)
        await runner.setup()
        collector = asyncio.create_task(collect_when_quiet(stop))
        try:
            await web.TCPSite(runner, host, port).start()
            for address in runner.addresses:
                print(f"listening on http://{_host_port(address)}", flush=True)
            if with_workers:
                await _workers(settings, db, stop)
            else:
                await stop.wait()
        finally:
            await runner.cleanup()
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)

    await _until_stopped(run)


async def _workers(settings: Settings, db: Database, stop: asyncio.Event) -> None:
    """Workers and scheduler; imported here so that ``api`` never loads them."""
    from syncsvc.runtime import run_workers

    await run_workers(settings, db, stop)


async def _until_stopped(body: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Runs ``body`` until SIGTERM or SIGINT sets its stop event; a second signal is not
    needed, ``body`` finishes the work in hand and returns."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await body(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")


def _host_port(address: object) -> str:
    """``runner.addresses`` holds socket names: ``(host, port)`` or ``(host, port, …)`` (IPv6)."""
    assert isinstance(address, tuple)
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _print_error(exc: SyncSvcError) -> None:
    print(f"syncsvc: {exc.message}", file=sys.stderr)
    for detail in exc.details:
        where = ".".join(str(part) for part in detail.loc)
        print(f"  {where}: {detail.msg}" if where else f"  {detail.msg}", file=sys.stderr)
