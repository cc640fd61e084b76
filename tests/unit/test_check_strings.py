"""The fast walk over a parsed body says exactly what the locating walk says: the same values
pass, and the same error (message and place) for those that do not."""

from __future__ import annotations

from typing import Any

import pytest

from syncsvc.api.bodies import JSON_MAX_DEPTH, _locate, check_strings
from syncsvc.errors import SyncSvcError


def nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


CASES = [
    {"targets": [{"id": "t1", "name": "ok", "contacts": [{"id": "c"}]}], "n": 1, "b": True},
    {"name": "nul\x00byte"},
    {"key\x00": "value"},
    {"a": ["x", ["y", "\ud800"]]},
    {"a": float("inf")},
    {"a": [1.5, float("nan")]},
    {"a": None, "b": False, "c": 3},
    {},
    [],
    *(nested(d, "leaf") for d in range(JSON_MAX_DEPTH - 3, JSON_MAX_DEPTH + 3)),
    *(nested(d, {}) for d in range(JSON_MAX_DEPTH - 3, JSON_MAX_DEPTH + 3)),
    *(nested(d, []) for d in range(JSON_MAX_DEPTH - 3, JSON_MAX_DEPTH + 3)),
    *(nested(d, {"s": "x"}) for d in range(JSON_MAX_DEPTH - 3, JSON_MAX_DEPTH + 3)),
]


def outcome(check: Any, value: Any) -> tuple[str, Any] | None:
    try:
        check(value, ("body",))
    except SyncSvcError as exc:
        return (exc.message, [(d.loc, d.msg) for d in exc.details])
    return None


@pytest.mark.parametrize("value", CASES)
def test_the_fast_walk_agrees_with_the_locating_walk(value: Any) -> None:
    assert outcome(check_strings, value) == outcome(_locate, value)


def test_both_walks_refuse_what_they_should() -> None:
    refused = [outcome(_locate, v) is not None for v in CASES[:9]]
    assert refused == [False, True, True, True, True, True, False, False, False]
    depths = [outcome(_locate, nested(d, "leaf")) is not None for d in (30, 31, 32)]
    assert depths == [False, False, True]
