"""The egress policy: tenant URLs never reach the operator's network.

Every probe uses a listener on loopback that must *not* be hit while the allow-list is off, so a
policy that only looked at the URL text (and not at the address really connected to) fails.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.test_utils import TestServer

from syncsvc.providers.egress import (
    AnswerTooLarge,
    EgressPolicy,
    GuardedConnector,
    is_refusal,
    read_bounded,
)

REFUSED = [
    "http://127.0.0.1:8080/",
    "https://127.0.0.1/",
    "https://[::1]/",
    "https://localhost/dav/",
    "https://printer.local/",
    "https://0.0.0.0/",
    "https://169.254.169.254/latest/meta-data/",
    "https://10.1.2.3/",
    "https://172.16.0.5/",
    "https://192.168.1.1/",
    "https://100.64.0.1/",
    "https://[fd00::1]/",
    "https://[fe80::1]/",
    "https://[::ffff:127.0.0.1]/",
    "https://[::ffff:10.0.0.1]/",
    "https://192.0.2.10/",
    "https://[2001:db8::1]/",
    "https://224.0.0.1/",
    "https://2130706433/",
    "https://0x7f.1/",
    "http://dav.example.com/",
    "https://ck:secret@dav.example.com/ck/",
    "ftp://dav.example.com/",
    "https:///nohost",
]
ACCEPTED = ["https://dav.example.com/ck/work/", "https://8.8.8.8/", "https://[2606:4700::1111]/"]


@pytest.mark.parametrize("url", REFUSED)
def test_the_policy_refuses_urls_into_the_operators_network(url: str) -> None:
    with pytest.raises(ValueError):
        EgressPolicy().check_url(url)


@pytest.mark.parametrize("url", ACCEPTED)
def test_public_https_urls_pass(url: str) -> None:
    assert EgressPolicy().check_url(url) == url


def test_the_allow_list_opens_named_hosts_and_networks_for_http_too() -> None:
    policy = EgressPolicy.parse("dav.corp.example, 127.0.0.1/32 10.20.0.0/16")
    for url in ("http://127.0.0.1:5232/u/", "http://dav.corp.example/x/", "https://10.20.3.4/"):
        assert policy.check_url(url) == url
    for url in ("http://127.0.0.2:5232/", "https://10.21.0.1/", "http://other.corp.example/"):
        with pytest.raises(ValueError):
            policy.check_url(url)
    with pytest.raises(ValueError, match="neither a host nor a CIDR"):
        EgressPolicy.parse("10.0.0.0/99")


class Listener:
    """A loopback HTTP server that counts what reaches it."""

    def __init__(self, handler: Callable[[web.Request], Any] | None = None) -> None:
        self.hits = 0
        self._handler = handler

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self._handler is not None:
            result: web.StreamResponse = await self._handler(request)
            return result
        return web.Response(text="secret")


async def _serve(listener: Listener, host: str = "127.0.0.1") -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", listener.handle)
    server = TestServer(app, host=host)
    await server.start_server()
    return server


@pytest.fixture
async def listener() -> AsyncIterator[tuple[Listener, TestServer]]:
    target = Listener()
    server = await _serve(target)
    yield target, server
    await server.close()


def _session(policy: EgressPolicy, **kwargs: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=GuardedConnector(policy, **kwargs))


async def test_a_loopback_listener_is_not_reached_without_the_allow_list(
    listener: tuple[Listener, TestServer],
) -> None:
    target, server = listener
    for url in (f"http://127.0.0.1:{server.port}/", f"http://localhost:{server.port}/"):
        async with _session(EgressPolicy()) as http:
            with pytest.raises(aiohttp.ClientError) as caught:
                await http.get(url)
        assert is_refusal(caught.value)
    assert target.hits == 0
    async with (
        _session(EgressPolicy.parse("127.0.0.1/32")) as http,
        http.get(f"http://127.0.0.1:{server.port}/") as answer,
    ):
        assert await answer.text() == "secret"
    assert target.hits == 1


class _RebindingResolver(AbstractResolver):
    """A DNS answer that changed after the URL was checked: the name now points at loopback."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[Any]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        return None


async def test_dns_rebinding_is_caught_at_connect_time(
    listener: tuple[Listener, TestServer],
) -> None:
    target, server = listener
    url = f"https://calendar.rebind.example:{server.port}/"
    assert EgressPolicy().check_url(url) == url  # the name alone looks public
    async with _session(EgressPolicy(), resolver=_RebindingResolver()) as http:
        with pytest.raises(aiohttp.ClientError) as caught:
            await http.get(url.replace("https", "http"))
    assert is_refusal(caught.value)
    assert target.hits == 0


async def test_a_redirect_into_a_refused_address_is_not_followed() -> None:
    inner = Listener()
    inner_server = await _serve(inner, host="127.0.0.2")

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"http://127.0.0.2:{inner_server.port}/admin")

    outer = Listener(redirect)
    outer_server = await _serve(outer)
    try:
        async with _session(EgressPolicy.parse("127.0.0.1/32")) as http:
            with pytest.raises(aiohttp.ClientError) as caught:
                await http.get(f"http://127.0.0.1:{outer_server.port}/")
        assert is_refusal(caught.value)
        assert (outer.hits, inner.hits) == (1, 0)
    finally:
        await outer_server.close()
        await inner_server.close()


async def test_answers_are_read_only_up_to_the_cap() -> None:
    async def huge_declared(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse(headers={"Content-Length": str(400 * 1024 * 1024)})
        await answer.prepare(request)
        await answer.write(b"x" * 1024)
        return answer

    async def huge_chunked(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse()
        answer.enable_chunked_encoding()
        await answer.prepare(request)
        for _ in range(64):
            await answer.write(b"y" * 65536)
        return answer

    async def small(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"z" * 1000)

    servers = [await _serve(Listener(h)) for h in (huge_declared, huge_chunked, small)]
    try:
        async with _session(EgressPolicy.parse("127.0.0.1/32")) as http:
            for server in servers[:2]:
                async with http.get(f"http://127.0.0.1:{server.port}/") as answer:
                    with pytest.raises(AnswerTooLarge):
                        await read_bounded(answer, max_bytes=1024 * 1024)
            async with http.get(f"http://127.0.0.1:{servers[2].port}/") as answer:
                assert await read_bounded(answer, max_bytes=1024 * 1024) == b"z" * 1000
    finally:
        for server in servers:
            await server.close()
