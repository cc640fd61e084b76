"""The one status → error table, as each provider reaches it with its own nuances: Google's
rate-limit 403s, Graph's Retry-After on 503, 423 Locked and lock-related 409s as transient."""

from __future__ import annotations

import json

import httplib2
import pytest
from googleapiclient.errors import HttpError

from syncsvc.errors import (
    AuthFailed,
    Permanent,
    ProviderConflict,
    ProviderError,
    ProviderNotFound,
    Throttled,
    Transient,
)
from syncsvc.providers._http import error_for_status
from syncsvc.providers.google import map_http_error
from syncsvc.providers.graph import GraphAnswer, error_for


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (401, AuthFailed),
        (403, AuthFailed),
        (404, ProviderNotFound),
        (410, ProviderNotFound),
        (408, Transient),
        (409, ProviderConflict),
        (412, ProviderConflict),
        (423, Transient),
        (429, Throttled),
        (400, Permanent),
        (422, Permanent),
        (500, Transient),
        (503, Transient),
    ],
)
def test_each_status_has_one_meaning(status: int, kind: type[ProviderError]) -> None:
    assert type(error_for_status(status, "x")) is kind


def test_retry_after_throttles_503_and_travels_with_transient_errors() -> None:
    throttled = error_for_status(503, "x", retry_after_s=7.0)
    assert isinstance(throttled, Throttled) and throttled.retry_after_s == 7.0
    locked = error_for_status(423, "x", retry_after_s=3.0)
    assert isinstance(locked, Transient) and locked.retry_after_s == 3.0


def test_a_409_naming_a_lock_is_transient_a_plain_one_a_conflict() -> None:
    assert type(error_for_status(409, "x", locked=True)) is Transient
    assert type(error_for_status(409, "x")) is ProviderConflict
    assert type(error_for_status(412, "x", locked=True)) is ProviderConflict


def graph(status: int, code: str, retry_after: str | None = None) -> ProviderError:
    headers = {"retry-after": retry_after} if retry_after else {}
    return error_for(GraphAnswer(status, headers, {"error": {"code": code, "message": "m"}}), "op")


def test_graph_nuances() -> None:
    throttled = graph(429, "ApplicationThrottled", "2")
    assert isinstance(throttled, Throttled) and throttled.retry_after_s == 2.0
    assert type(graph(503, "ServiceNotAvailable", "5")) is Throttled
    assert type(graph(503, "ServiceNotAvailable")) is Transient
    assert type(graph(423, "ErrorItemLocked")) is Transient
    assert "ErrorItemLocked" in graph(423, "ErrorItemLocked").message


def google(status: int, reason: str) -> ProviderError:
    body = {"error": {"code": status, "message": "m", "errors": [{"reason": reason}]}}
    response = httplib2.Response({"status": str(status)})
    return map_http_error(HttpError(response, json.dumps(body).encode()))


def test_google_nuances() -> None:
    assert type(google(403, "rateLimitExceeded")) is Throttled
    assert type(google(403, "userRateLimitExceeded")) is Throttled
    quota = google(403, "quotaExceeded")
    assert isinstance(quota, Throttled) and quota.retry_after_s is not None
    assert quota.retry_after_s > 0
    assert type(google(403, "forbidden")) is AuthFailed
    assert type(google(410, "deleted")) is ProviderNotFound
    assert type(google(409, "duplicate")) is ProviderConflict
