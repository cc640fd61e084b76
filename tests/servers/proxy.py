"""A small local HTTP proxy in front of a real CalDAV server, for answers the server itself
never gives (redirects, ``423 Locked`` storms, a missing REPORT).

``intercept(request, body)`` sees each request first: it returns an answer of its own, or
``None`` to pass the request on to the server unchanged (headers a CalDAV client sends, the
body as read). The server's answer comes back with its status, body and the headers that
matter to a client. ``in_flight`` (if given) counts the requests being passed on, by method,
so an intercept can tell which requests overlap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from tests.servers.xandikos import free_port

Intercept = Callable[[web.Request, bytes], Awaitable[web.StreamResponse | None]]
_PASSED = ("authorization", "content-type", "depth", "if-match", "if-none-match")
_KEPT = ("etag", "content-type", "location")


async def _pass(_: web.Request, __: bytes) -> web.StreamResponse | None:
    return None


@asynccontextmanager
async def caldav_proxy(
    upstream: str, intercept: Intercept = _pass, in_flight: Counter[str] | None = None
) -> AsyncIterator[str]:
    """Serves on a free 127.0.0.1 port; yields its base URL (no trailing slash)."""
    upstream = upstream.rstrip("/")
    counts: Counter[str] = Counter() if in_flight is None else in_flight
    async with aiohttp.ClientSession() as session:

        async def forward(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            own = await intercept(request, body)
            if own is not None:
                return own
            headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED}
            counts[request.method] += 1
            try:
                async with session.request(
                    request.method,
                    upstream + request.path_qs,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                ) as answer:
                    kept = {k: v for k, v in answer.headers.items() if k.lower() in _KEPT}
                    content = await answer.read()
                    return web.Response(status=answer.status, body=content, headers=kept)
            finally:
                counts[request.method] -= 1

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()
