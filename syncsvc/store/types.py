"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import BigInteger, Boolean, ColumnElement, DateTime, String, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeDecorator, TypeEngine


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
    """The engines' JSON serialiser: ``dumps_fast``, but a ``JsonText`` passes through."""
    return value if isinstance(value, JsonText) else dumps_fast(value)


def json_loads(text: str | bytes) -> Any:
    """The engines' JSON parser: orjson (the worker reads several JSON columns per event),
    ``json`` for what orjson refuses (``NaN``, which ``json.dumps`` may have written). Like the
    API's parser (``api/bodies.py``), orjson reads integers beyond 64 bits as floats."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


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


class IdList(TypeDecorator[list[int]]):
    """A list of integer ids bound as one parameter: ``bigint[]`` on PostgreSQL, a JSON array
    on SQLite (read by ``json_each``). See ``in_ids``."""

    impl = String
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(ARRAY(BigInteger))
        return dialect.type_descriptor(String())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        ids = [int(i) for i in value]
        return ids if dialect.name == "postgresql" else orjson.dumps(ids).decode()


class InIds(ColumnElement[bool]):
    """``column IN ids`` with the ids as one parameter (``IdList``): ``= ANY(...)`` on
    PostgreSQL, ``IN (SELECT value FROM json_each(...))`` on SQLite.

    An ``IN (...)`` list renders one parameter per id, so each count of ids is a statement
    of its own to render, and on PostgreSQL to prepare; the worker's hot statements (claims,
    transitions) take lists of every length from 1 to a chunk's size."""

    inherit_cache = True
    type = Boolean()
    _is_implicitly_boolean = True
    _traverse_internals = [  # noqa: RUF012 (SQLAlchemy reads it as a class attribute)
        ("column", InternalTraversal.dp_clauseelement),
        ("ids", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: ColumnElement[Any], ids: ColumnElement[Any]) -> None:
        self.column = column
        self.ids = ids


def in_ids(column: ColumnElement[Any], ids: Any = None, *, name: str | None = None) -> InIds:
    """``InIds`` over a value now, or (``name``) a parameter given at execution."""
    if name is not None:
        return InIds(column, bindparam(name, type_=IdList()))
    return InIds(column, bindparam(None, list(ids), type_=IdList()))


@compiles(InIds, "postgresql")
def _in_ids_postgresql(element: InIds, compiler: SQLCompiler, **kw: Any) -> str:
    return f"{compiler.process(element.column, **kw)} = ANY({compiler.process(element.ids, **kw)})"


@compiles(InIds)
def _in_ids_sqlite(element: InIds, compiler: SQLCompiler, **kw: Any) -> str:
    column, ids = compiler.process(element.column, **kw), compiler.process(element.ids, **kw)
    return f"{column} IN (SELECT value FROM json_each({ids}))"
