"""The dashboard against a guessing attacker and a stolen cookie: failed sign-ins lock an
address (and, spread over many, everyone) out before the key is compared; signing out ends the
session on the server, on every API process; the cookie is Secure behind an https base URL.

Time is a clock the test moves (in process) or what Redis's TTLs say; nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import pytest_asyncio
from aiohttp import DummyCookieJar, web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.dashboard import session
from syncsvc.dashboard.guard import (
    CLIENT_FAILURES_MAX,
    FAILURE_WINDOW_S,
    GUARD,
    Guard,
    MemoryGuard,
    RedisGuard,
    client_of,
)
from syncsvc.store.db import Database
from tests.servers.redis import free_port

OPERATOR_KEY = "op-" + "s" * 40
SECRET_KEY = "sessions-secret-key-" + "x" * 32
Client = TestClient[web.Request, web.Application]
#: Builds a served app from settings overrides, and a guard to put in it (``None``: its own).
Serve = Callable[..., Awaitable[Client]]


class MovableClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """Serves apps on one database, as separate API processes would be."""
    url = f"sqlite:///{tmp_path / 'dashboard.db'}"
    db = Database(url)
    await db.migrate()
    clients: list[Client] = []

    async def start(guard: Guard | None = None, **overrides: Any) -> Client:
        fields = {"secret_key": SECRET_KEY, "operator_key": OPERATOR_KEY, **overrides}
        settings = Settings(database_url=url, **fields)
        app = build_app(settings, db)
        if guard is not None:
            app[GUARD] = guard
        # No cookie jar: every request says which cookie it sends, as an attacker's would.
        client: Client = TestClient(TestServer(app), cookie_jar=DummyCookieJar())
        await client.start_server()
        clients.append(client)
        return client

    try:
        yield start
    finally:
        for client in clients:
            await client.close()
        await db.aclose()


async def login(client: Client, key: str) -> Any:
    return await client.post("/dashboard/login", json={"key": key})


def cookie_of(answer: Any) -> str:
    return str(answer.cookies[session.COOKIE_NAME].value)


def with_cookie(cookie: str) -> dict[str, str]:
    return {"Cookie": f"{session.COOKIE_NAME}={cookie}"}


async def data_with(client: Client, cookie: str) -> int:
    answer = await client.get("/dashboard/data.json", headers=with_cookie(cookie))
    return int(answer.status)


# --- Failed sign-ins -----------------------------------------------------------------------


async def test_wrong_keys_lock_the_address_out_even_for_the_right_key(serve: Serve) -> None:
    clock = MovableClock()
    client = await serve(MemoryGuard(clock=clock))
    for _ in range(CLIENT_FAILURES_MAX):
        assert (await login(client, "guess")).status == 401

    refused = await login(client, OPERATOR_KEY)
    assert refused.status == 429
    assert refused.headers["Retry-After"] == str(int(FAILURE_WINDOW_S))
    error = (await refused.json())["error"]
    assert error["code"] == "too_many_sign_ins"
    assert f"try again in {int(FAILURE_WINDOW_S)} seconds" in error["message"]
    assert session.COOKIE_NAME not in refused.cookies
    # The bearer on any dashboard route is the same guess, so it waits too.
    for method, path in (("GET", "/dashboard"), ("GET", "/dashboard/data.json")):
        bearer = await client.request(
            method, path, headers={"Authorization": f"Bearer {OPERATOR_KEY}"}
        )
        assert bearer.status == 429, path
        assert bearer.headers["Retry-After"]

    clock.now += FAILURE_WINDOW_S - 1
    almost = await login(client, OPERATOR_KEY)
    assert (almost.status, almost.headers["Retry-After"]) == (429, "1")
    clock.now += 1
    assert (await login(client, OPERATOR_KEY)).status == 200


async def test_a_wrong_bearer_is_one_failure_on_every_route(serve: Serve) -> None:
    client = await serve(MemoryGuard(clock=MovableClock()))
    wrong = {"Authorization": "Bearer guess"}
    for path in ("/dashboard", "/dashboard/data.json") * ((CLIENT_FAILURES_MAX - 1) // 2):
        assert (await client.get(path, headers=wrong)).status == 401, path
    assert (await login(client, OPERATOR_KEY)).status == 200


async def test_wrong_operator_keys_on_the_ops_api_are_throttled_alike(serve: Serve) -> None:
    clock = MovableClock()
    client = await serve(MemoryGuard(clock=clock))
    for n in range(CLIENT_FAILURES_MAX):
        guess = {"Authorization": f"Bearer guess-{n}"}
        assert (await client.get("/v1/ops/queue", headers=guess)).status == 401
    right = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    refused = await client.get("/v1/ops/queue", headers=right)
    assert refused.status == 429
    assert refused.headers["Retry-After"] == str(int(FAILURE_WINDOW_S))
    assert (await login(client, OPERATOR_KEY)).status == 429  # one count for both doors
    clock.now += FAILURE_WINDOW_S
    assert (await client.get("/v1/ops/queue", headers=right)).status == 200


async def test_the_right_key_clears_the_addresses_failures(serve: Serve) -> None:
    client = await serve(MemoryGuard(clock=MovableClock()))
    for _ in range(2):
        for _ in range(CLIENT_FAILURES_MAX - 1):
            assert (await login(client, "guess")).status == 401
        assert (await login(client, OPERATOR_KEY)).status == 200
    for _ in range(CLIENT_FAILURES_MAX):
        assert (await login(client, "guess")).status == 401
    assert (await login(client, OPERATOR_KEY)).status == 429


@pytest.fixture(params=["memory", "redis"])
def make_guard(request: pytest.FixtureRequest) -> Callable[..., Guard]:
    if request.param == "memory":
        return MemoryGuard
    url = request.getfixturevalue("redis_url")
    return lambda **limits: RedisGuard.from_url(url, **limits)


async def test_many_addresses_together_are_capped(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(client_max=3, all_max=10)
    try:
        assert await guard.attempt("10.0.0.99") == 0
        await guard.succeeded("10.0.0.99")  # a right key costs the cap nothing
        for n in range(5):
            for _ in range(2):  # below each address's own limit
                assert await guard.attempt(f"10.0.0.{n}") == 0
        assert 0 < await guard.attempt("10.0.0.5") <= FAILURE_WINDOW_S  # a fresh address
        assert await guard.attempt("10.0.0.99") > 0
    finally:
        await guard.aclose()


async def test_concurrent_guesses_cannot_slip_past_the_count(serve: Serve, redis_url: str) -> None:
    """Each attempt is counted before the key is compared: 40 guesses at once from one
    address get 5 comparisons, on Redis as in process."""
    for guard in (MemoryGuard(), RedisGuard.from_url(redis_url)):
        client = await serve(guard)
        answers = await asyncio.gather(*(login(client, f"guess-{i}") for i in range(40)))
        statuses = sorted(a.status for a in answers)
        assert statuses.count(401) == CLIENT_FAILURES_MAX, statuses
        assert statuses.count(429) == 40 - CLIENT_FAILURES_MAX


async def test_api_processes_share_failures_and_sessions_through_redis(
    serve: Serve, redis_url: str
) -> None:
    one, two = await serve(redis_url=redis_url), await serve(redis_url=redis_url)
    assert isinstance(one.app[GUARD], RedisGuard)

    signed_in = await login(one, OPERATOR_KEY)
    cookie = cookie_of(signed_in)
    assert await data_with(two, cookie) == 200
    assert (await two.post("/dashboard/logout", headers=with_cookie(cookie))).status == 204
    assert await data_with(one, cookie) == 401

    for _ in range(CLIENT_FAILURES_MAX):
        assert (await login(one, "guess")).status == 401
    refused = await login(two, OPERATOR_KEY)
    assert refused.status == 429
    assert 0 < int(refused.headers["Retry-After"]) <= FAILURE_WINDOW_S


async def test_sign_in_fails_closed_when_redis_does_not_answer(serve: Serve) -> None:
    client = await serve(RedisGuard.from_url(f"redis://127.0.0.1:{free_port()}/0"))
    answer = await login(client, OPERATOR_KEY)
    assert answer.status == 503
    assert (await answer.json())["error"]["code"] == "sign_in_unavailable"


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    def client(peer: str) -> str:
        transport = mock.Mock()
        transport.get_extra_info.return_value = (peer, 0)
        return client_of(make_mocked_request("GET", "/", transport=transport))

    assert client("2001:db8:1:2:aaaa::1") == client("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client("::ffff:192.0.2.7") == client("192.0.2.7") == "192.0.2.7"


# --- Sign-out ------------------------------------------------------------------------------


async def test_a_copied_cookie_is_refused_after_sign_out(serve: Serve) -> None:
    client = await serve(MemoryGuard())
    cookie = cookie_of(await login(client, OPERATOR_KEY))
    assert await data_with(client, cookie) == 200

    out = await client.post("/dashboard/logout", headers=with_cookie(cookie))
    assert out.status == 204
    assert out.cookies[session.COOKIE_NAME].value == ""

    assert await data_with(client, cookie) == 401
    page = await client.get("/dashboard", headers=with_cookie(cookie))
    assert 'id="login"' in await page.text()


async def test_a_forged_or_foreign_cookie_opens_nothing(serve: Serve) -> None:
    guard = MemoryGuard()
    client = await serve(guard)
    cookie = cookie_of(await login(client, OPERATOR_KEY))
    forged = ("y" if cookie[0] == "x" else "x") + cookie[1:]  # one character off, surely
    assert await data_with(client, forged) == 401
    # Another operator key (a rotation) signs every session out.
    rotated = await serve(guard, operator_key="op-" + "r" * 40)
    assert await data_with(rotated, cookie) == 401


# --- Cookie flags --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "secure"),
    [
        ("https://sync.example.com", True),
        ("HTTPS://sync.example.com", True),
        ("http://127.0.0.1:8080", False),
    ],
)
async def test_cookie_is_secure_exactly_behind_an_https_base_url(
    serve: Serve, base_url: str, secure: bool
) -> None:
    client = await serve(MemoryGuard(), public_base_url=base_url)
    for answer in (
        await login(client, OPERATOR_KEY),
        await client.post("/dashboard/logout"),
    ):
        morsel = answer.cookies[session.COOKIE_NAME]
        assert bool(morsel["secure"]) is secure, answer.headers.getall("Set-Cookie")
        assert morsel["httponly"] and morsel["samesite"] == "Strict"
        assert morsel["path"] == session.COOKIE_PATH
