"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class JsonText(str):
    """A JSON column's value serialised ahead, stored as it is: a batch's stored request is
    20 MB for 100,000 targets, and ``json.dumps`` of it, one call holding the GIL, is made
    in a thread instead of on the event loop at flush."""


def dumps_fast(value: Any) -> str:
    """``json.dumps`` of plain JSON values (str keys, 64-bit ints) by orjson, several times
    quicker on the bulk paths (rows, a batch's stored request); anything orjson refuses goes
    through ``json``."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)


def json_dumps(value: Any) -> str:
    """The engines' JSON serialiser: ``json.dumps``, but a ``JsonText`` passes through."""
    return value if isinstance(value, JsonText) else json.dumps(value)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores instants as naive UTC and hands back aware UTC datetimes.

    SQLite keeps no offset, so storing naive UTC everywhere keeps ordering and comparisons
    identical across backends.
    """

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError(f"UTCDateTime needs an aware datetime, got {value!r}")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)
