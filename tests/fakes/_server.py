"""What the provider fakes share: an aiohttp server on a free 127.0.0.1 port (https if their
clients insist), background deliveries that ``stop`` must not leave behind, a route table, and
answers kept as data because batches embed them as well as send them.
"""

from __future__ import annotations

import asyncio
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiohttp
from aiohttp import web

from tests.fakes._tls import TlsFiles, combined_ca_bundle, make_self_signed

#: What ``web.json_response`` sends.
JSON_TYPE = "application/json; charset=utf-8"

H = TypeVar("H")


@dataclass(frozen=True, slots=True)
class Response:
    """One API answer: ``body`` is a JSON-able value, bytes sent as they are, or None."""

    status: int
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = JSON_TYPE

    def to_bytes(self) -> bytes:
        if self.body is None or isinstance(self.body, bytes):
            return self.body or b""
        return json.dumps(self.body).encode()

    def to_web(self) -> web.Response:
        if self.body is None:
            return web.Response(status=self.status, headers=self.headers)
        headers = {"Content-Type": self.content_type, **self.headers}
        return web.Response(status=self.status, body=self.to_bytes(), headers=headers)


class Routes(Generic[H]):
    """(method, regex of the whole path, handler), tried in order."""

    def __init__(self, *routes: tuple[str, str, H]) -> None:
        self._routes = [(method, re.compile(path), handler) for method, path, handler in routes]

    def find(self, method: str, path: str) -> tuple[H, re.Match[str]] | None:
        for route_method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is not None and route_method == method:
                return handler, match
        return None


class FakeServer(ABC):
    """Start/stop of one fake; subclasses register their endpoints in :meth:`add_routes`."""

    #: The certificate's file name for an https fake (its clients refuse http); None: http.
    tls_name: str | None = None
    client_max_size = 1024**2
    #: Whether a handler is cancelled when its client hangs up (aiohttp's default: no).
    handler_cancellation = False

    def __init__(self) -> None:
        self.port = 0
        self.tls: TlsFiles | None = None
        #: System CAs plus the fake's certificate: what SSL_CERT_FILE should name in tests.
        self.ca_bundle: Path | None = None
        self._runner: web.AppRunner | None = None
        #: For deliveries; exists while the fake runs.
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    @property
    def base_url(self) -> str:
        return f"{'http' if self.tls_name is None else 'https'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        assert self.tls is not None, "start() the fake first"
        return self.tls.cert_path

    @abstractmethod
    def add_routes(self, app: web.Application) -> None: ...

    async def start(self, directory: Path | None = None) -> None:
        """Serves on a free port; an https fake writes its certificate into ``directory``."""
        ssl_context = None
        if self.tls_name is not None:
            assert directory is not None, "an https fake needs a directory for its certificate"
            self.tls = make_self_signed(directory, self.tls_name)
            self.ca_bundle = combined_ca_bundle([self.tls.cert_path], directory / "ca-bundle.pem")
            ssl_context = self.tls.server_context()
        app = web.Application(client_max_size=self.client_max_size)
        self.add_routes(app)
        self._runner = web.AppRunner(
            app,
            handler_cancellation=self.handler_cancellation,
            access_log=None,
            shutdown_timeout=1,
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        self.port = self._runner.addresses[0][1]
        self._http = aiohttp.ClientSession()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        """Runs a delivery in the background, where ``stop`` will find it; a fake that is not
        running has nobody to deliver to."""
        if self._http is None:
            coro.close()
            return
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()
            return  # no loop (a synchronous caller): nobody could receive it anyway
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
