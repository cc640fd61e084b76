"""Hostile request bodies get a clear 4xx, never a 500 with a traceback."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from syncsvc.providers._http import RETRY_AFTER_MAX_S, parse_retry_after
from tests.api.conftest import OPERATOR_KEY, Tenants

Client = TestClient[web.Request, web.Application]
JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("depth", [33, 1_000, 100_000])
async def test_deeply_nested_json_is_400_on_every_json_edge(
    client: Client, tenants: Tenants, caplog: pytest.LogCaptureFixture, depth: int
) -> None:
    body = b'{"targets": ' + b"[" * depth + b"]" * depth + b"}"
    for path, headers in (
        ("/v1/plans", {**JSON, **tenants.a.headers}),
        ("/dashboard/login", JSON),
    ):
        with caplog.at_level(logging.WARNING):
            answer = await client.post(path, data=body, headers=headers)
        assert answer.status == 400, (path, await answer.text())
        error = (await answer.json())["error"]
        assert error["code"] == "bad_request"
        assert "nested" in error["message"]
    assert "Traceback" not in caplog.text
    assert "RecursionError" not in caplog.text


async def test_ordinary_nesting_still_validates(client: Client, tenants: Tenants) -> None:
    answer = await client.post(
        "/dashboard/login", data=b'{"key": "' + OPERATOR_KEY.encode() + b'"}', headers=JSON
    )
    assert answer.status in (200, 204, 303), await answer.text()


@pytest.mark.parametrize(
    "header", ["99999999999999", "1e308", "Fri, 31 Dec 9999 23:59:59 GMT", str(10**400)]
)
def test_a_huge_retry_after_is_capped(header: str) -> None:
    assert parse_retry_after(header, now_s=0.0) == RETRY_AFTER_MAX_S
