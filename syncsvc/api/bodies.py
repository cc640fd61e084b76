"""JSON input and output: checked strictly, and large bodies handled so the event loop stays free.

A plan of 100,000 targets is a 20 MB body. ``json.loads`` and pydantic's validation of it are
each one C/Rust call that holds the GIL for seconds, in a thread too, and every other tenant's
request (and Graph's webhooks, answered within 3 s) would wait for it. So a large body of a
heavy endpoint is parsed in a child process (``BodyPool``), which checks it and cuts its large
lists into chunks of JSON; this process validates the chunks one by one in a thread, each call
short enough for the loop to get the GIL in between. Large answers are serialised in chunks
the same way (``dump_json``).
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import ErrorDetails

from syncsvc.errors import BadRequest, ErrorDetail, ValidationError

_BAD_STRING = re.compile("[\x00\ud800-\udfff]")
#: Deepest JSON nesting accepted: far beyond any request of ours, far below the stack limit.
JSON_MAX_DEPTH = 32
#: A heavy endpoint's body above this size is parsed in a child process (smaller ones are
#: quicker parsed than handed over).
HEAVY_BODY_BYTES = 64 * 1024
#: Items of a large list validated or serialised per call: each call holds the GIL, so it
#: must stay well under the few milliseconds a webhook may wait.
CHUNK_ITEMS = 250


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """A body as ``model``: 400 for what is not JSON, 422 for what does not fit, strictly."""
    check_strings(_loads(raw), ("body",))
    try:
        return model.model_validate_json(raw, strict=True)
    except PydanticValidationError as exc:
        raise validation_error(exc, ("body",)) from exc


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("the body is not valid JSON", [ErrorDetail(("body",), str(exc))]) from exc
    except RecursionError as exc:
        raise _too_deep(("body",)) from exc


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _too_deep(loc: tuple[str | int, ...]) -> BadRequest:
    return BadRequest(
        "the body is nested too deeply",
        [ErrorDetail(loc, f"JSON may nest at most {JSON_MAX_DEPTH} levels")],
    )


def check_strings(value: Any, loc: tuple[str | int, ...]) -> None:
    """NUL and lone surrogates cannot be stored (PostgreSQL, UTF-8): refuse them as input.
    Nesting is capped too, so no input can exhaust the stack of a later recursive walk.

    A clean value (nearly every one) is passed by a walk that builds no locations, in half
    the time; only a value that fails is walked again to say where."""
    if _clean(value, JSON_MAX_DEPTH - len(loc)):
        return
    _locate(value, loc)


def _clean(value: Any, depth_left: int) -> bool:
    """Whether ``value`` (``depth_left`` levels above the cap) passes :func:`check_strings`;
    whatever it does not know for sure (other types) it leaves to the slow walk."""
    if depth_left < 0:
        return False
    kind = type(value)
    if kind is str:
        return _BAD_STRING.search(value) is None
    if kind is dict:
        if depth_left == 0:
            return not value  # any item would be too deep
        for key, item in value.items():
            if _BAD_STRING.search(key) is not None:
                return False
            if type(item) is str:
                if _BAD_STRING.search(item) is not None:
                    return False
            elif not _clean(item, depth_left - 1):
                return False
        return True
    if kind is list:
        return all(_clean(item, depth_left - 1) for item in value)
    if kind is float:
        return math.isfinite(value)
    return kind in (int, bool) or value is None


def _locate(value: Any, loc: tuple[str | int, ...]) -> None:
    """The error for the first bad string, float or nesting in ``value``, at its location."""
    if len(loc) > JSON_MAX_DEPTH:
        raise _too_deep(loc[:1])
    if isinstance(value, str):
        if _BAD_STRING.search(value):
            raise ValidationError(
                "the request is not valid",
                [ErrorDetail(loc, "must not contain NUL characters or lone surrogates")],
            )
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _locate(key, loc)
            _locate(item, (*loc, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _locate(item, (*loc, index))
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValidationError("the request is not valid", [ErrorDetail(loc, "must be finite")])


def validation_error(
    exc: PydanticValidationError, prefix: tuple[str | int, ...]
) -> ValidationError:
    """A pydantic failure as our 422, each detail's ``loc`` naming the field."""
    details = [ErrorDetail((*prefix, *err["loc"]), _message(err)) for err in exc.errors()]
    return ValidationError("the request is not valid", details)


def _message(err: ErrorDetails) -> str:
    """Our own validators' words without pydantic's "Value error, " prefix."""
    cause = (err.get("ctx") or {}).get("error")
    if err["type"] == "value_error" and isinstance(cause, ValueError):
        return str(cause)
    return err["msg"]


# --- Large bodies. ---

#: A body cut up by the child: itself with each large list down to its first item, and per
#: large list (by JSON key) the rest of its items as chunks of JSON arrays.
Split = tuple[bytes, dict[str, list[bytes]]]


def split_body(raw: bytes, keys: tuple[str, ...]) -> Split:
    """In the child process: parses and checks the body, and cuts the lists under ``keys``
    (the model's top-level list fields) into chunks.

    orjson parses and cuts, twice as fast as ``json`` and five times for the chunks; a body
    it refuses (NaN, lone surrogates, nesting past 1,024, a BOM: most of them refused by
    ``json`` too) is parsed again by ``json``, so the answer says what it always said."""
    dumps: Callable[[Any], bytes] = orjson.dumps
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data, dumps = _loads(raw), _json_bytes
    check_strings(data, ("body",))
    if not isinstance(data, dict):
        return raw, {}
    rest: dict[str, list[bytes]] = {}
    for key in keys:
        items = data.get(key)
        if isinstance(items, list) and len(items) > CHUNK_ITEMS:
            data[key] = items[:1]  # the model sees one item: a minimum length still holds
            rest[key] = [
                dumps(items[i : i + CHUNK_ITEMS]) for i in range(1, len(items), CHUNK_ITEMS)
            ]
    if not rest:
        return raw, {}
    return dumps(data), rest


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def assemble(model: type[BaseModel], split: Split) -> BaseModel:
    """In a thread of this process: the model from the child's pieces, validated chunk by
    chunk, with errors located as in the whole body."""
    head, rest = split
    try:
        body = model.model_validate_json(head, strict=True)
    except PydanticValidationError as exc:
        raise validation_error(exc, ("body",)) from exc
    if not rest:
        return body
    by_key = {f.alias or name: name for name, f in type(body).model_fields.items()}
    update: dict[str, Any] = {}
    for key, chunks in rest.items():
        name = by_key[key]
        adapter = TypeAdapter[list[Any]](type(body).model_fields[name].annotation)  # type: ignore[arg-type]
        items = list(getattr(body, name))
        for chunk in chunks:
            try:
                items.extend(adapter.validate_json(chunk, strict=True))
            except PydanticValidationError as exc:
                offset = len(items)
                raise ValidationError(
                    "the request is not valid",
                    [
                        ErrorDetail(
                            ("body", key, offset + int(err["loc"][0]), *err["loc"][1:]),
                            _message(err),
                        )
                        for err in exc.errors()
                    ],
                ) from exc
        update[name] = items
    return body.model_copy(update=update)


class BodyPool:
    """Child processes for parsing large bodies, started on first use (most processes never
    see one) and stopped with the app."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    async def parse(self, raw: bytes, model: type[BaseModel]) -> BaseModel:
        if self._pool is None:
            # forkserver: the children do not inherit this process's threads and sockets.
            context = multiprocessing.get_context("forkserver")
            self._pool = ProcessPoolExecutor(self.processes, mp_context=context)
        keys = tuple(
            f.alias or name
            for name, f in model.model_fields.items()
            if getattr(f.annotation, "__origin__", None) is list
        )
        loop = asyncio.get_running_loop()
        split = await loop.run_in_executor(self._pool, split_body, raw, keys)
        return await asyncio.to_thread(assemble, model, split)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# --- Large answers. ---


def dump_json(model: BaseModel) -> bytes:
    """``model.model_dump_json(by_alias=True)``, its large top-level lists serialised in
    chunks so that no single call holds the GIL for long."""
    fields = type(model).model_fields
    large = {
        name
        for name in fields
        if isinstance(value := getattr(model, name), list) and len(value) > CHUNK_ITEMS
    }
    if not large:
        return model.model_dump_json(by_alias=True).encode()
    parts: list[str] = []
    for name in fields:
        if name not in large:
            part = model.model_dump_json(by_alias=True, include={name})
            if part != "{}":
                parts.append(part[1:-1])
            continue
        items = getattr(model, name)
        empty = model.model_copy(update={name: []}).model_dump_json(by_alias=True, include={name})
        key = empty[1:-3]  # '{"key":[]}' → '"key":'
        pieces = [
            model.model_copy(update={name: items[i : i + CHUNK_ITEMS]}).model_dump_json(
                by_alias=True, include={name}
            )[len(key) + 2 : -2]
            for i in range(0, len(items), CHUNK_ITEMS)
        ]
        parts.append(f"{key}[{','.join(pieces)}]")
    return f"{{{','.join(parts)}}}".encode()
