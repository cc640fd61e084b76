"""Lists: ``?limit=&cursor=`` keyset pagination, ``{"items", "next_cursor"}``, and CSV and
XLSX export.

The cursor is opaque to clients: base64url of the JSON list of the last row's sort key. A
service lists ``limit + 1`` rows after ``decode_cursor(query.cursor)``; ``page()`` cuts the
extra row off and turns it into ``next_cursor``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import io
import json
import tempfile
from collections.abc import AsyncIterable, Callable, Sequence
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from aiohttp import web
from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.worksheet._write_only import WriteOnlyWorksheet
from pydantic import BaseModel, Field, field_validator

from syncsvc.errors import ErrorDetail, ValidationError

LIMIT_DEFAULT = 50
LIMIT_MAX = 500
CURSOR_MAX_CHARS = 1000
#: Rows written to the socket per chunk of a CSV export.
CSV_FLUSH_ROWS = 500
#: Rows handed to the XLSX writer (in a thread) at a time.
XLSX_CHUNK_ROWS = 1000
#: Bytes of the finished XLSX file written to the socket at a time.
XLSX_SEND_BYTES = 64 * 1024
XLSX_MEDIA_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
#: First characters a spreadsheet reads as a formula (OWASP CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

T = TypeVar("T")
R = TypeVar("R")


class PageQuery(BaseModel):
    """``limit`` above the maximum is clamped (the contract), below 1 refused."""

    limit: int = Field(
        default=LIMIT_DEFAULT,
        ge=1,
        description=f"Page size; default {LIMIT_DEFAULT}, values above {LIMIT_MAX} are clamped.",
    )
    cursor: str | None = Field(
        default=None,
        max_length=CURSOR_MAX_CHARS,
        pattern=r"^[A-Za-z0-9_-]*$",
        description="The `next_cursor` of the previous page.",
    )

    @field_validator("limit")
    @classmethod
    def _clamp(cls, value: int) -> int:
        return min(value, LIMIT_MAX)


class ExportQuery(PageQuery):
    """A list that can also be exported whole as CSV (``?format=csv``)."""

    format: Literal["json", "csv"] = Field(
        default="json", description="`csv`: every row, one CSV with a header, unpaginated."
    )


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


def encode_cursor(key: Sequence[str | int | float | None]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> list[Any] | None:
    """The sort key a cursor stands for; anything not made by ``encode_cursor`` is a 422."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise _bad_cursor() from exc
    if not isinstance(key, list):
        raise _bad_cursor()
    return key


def cursor_key(cursor: str | None, *parts: type) -> tuple[Any, ...] | None:
    """A cursor's sort key checked against its parts' types (``int``, ``str``, or
    ``datetime`` carried as ISO text); anything else is a 422."""
    key = decode_cursor(cursor)
    if key is None:
        return None
    if len(key) != len(parts):
        raise _bad_cursor()
    typed: list[Any] = []
    for value, kind in zip(key, parts, strict=True):
        if kind is datetime and isinstance(value, str):
            try:
                typed.append(datetime.fromisoformat(value))
            except ValueError as exc:
                raise _bad_cursor() from exc
        elif kind in (int, str) and type(value) is kind:
            typed.append(value)
        else:
            raise _bad_cursor()
    return tuple(typed)


def _bad_cursor() -> ValidationError:
    return ValidationError(
        "the cursor is not valid", [ErrorDetail(("query", "cursor"), "not a cursor from this API")]
    )


def page(
    model: type[Page[T]],
    rows: Sequence[R],
    limit: int,
    item: Callable[[R], T],
    sort_key: Callable[[R], Sequence[Any]],
) -> Page[T]:
    """A page (of ``model``, e.g. ``Page[UserOut]``) from ``limit + 1`` fetched rows: the extra
    row only says that more exist."""
    shown = rows[:limit]
    more = len(rows) > limit and bool(shown)
    return model(
        items=[item(row) for row in shown],
        next_cursor=encode_cursor(sort_key(shown[-1])) if more else None,
    )


def csv_cell(value: Any) -> Any:
    """A cell as text a spreadsheet shows rather than runs: text opening like a formula gets a
    leading ``'`` (OWASP), so a subject ``=HYPERLINK(...)`` from a CRM stays a subject."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


async def csv_response(
    request: web.Request,
    header: Sequence[str],
    rows: AsyncIterable[Sequence[Any]],
    filename: str = "export.csv",
) -> web.StreamResponse:
    """Streams one CSV (header + every row) without holding the whole export in memory."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{filename}"',
        }
    )
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    count = 0
    async for row in rows:
        writer.writerow([csv_cell(value) for value in row])
        count += 1
        if count % CSV_FLUSH_ROWS == 0:
            await response.write(buffer.getvalue().encode())
            buffer.seek(0)
            buffer.truncate()
    await response.write(buffer.getvalue().encode())
    await response.write_eof()
    return response


def xlsx_cell(value: Any) -> Any:
    """A cell as the CSV has it (formulas neutralised: openpyxl would store ``=…`` as a
    formula), without the control characters the XLSX format cannot hold."""
    value = csv_cell(value)
    if isinstance(value, str):
        return ILLEGAL_CHARACTERS_RE.sub("", value)
    return value


async def xlsx_response(
    request: web.Request,
    header: Sequence[str],
    rows: AsyncIterable[Sequence[Any]],
    filename: str = "export.xlsx",
    sheet: str = "export",
) -> web.StreamResponse:
    """One XLSX sheet (header + every row) built with openpyxl's write-only mode, which
    spools rows to a temporary file as they come, so a 100,000-row export holds one chunk in
    memory; the finished file is then streamed from disk. The writing runs in threads, off
    the event loop."""
    workbook = Workbook(write_only=True)
    worksheet = workbook.create_sheet(sheet)
    chunk: list[list[Any]] = [list(header)]
    async for row in rows:
        chunk.append([xlsx_cell(value) for value in row])
        if len(chunk) >= XLSX_CHUNK_ROWS:
            await asyncio.to_thread(_append, worksheet, chunk)
            chunk = []
    await asyncio.to_thread(_append, worksheet, chunk)
    with tempfile.TemporaryFile() as out:
        await asyncio.to_thread(workbook.save, out)
        size = out.tell()
        out.seek(0)
        response = web.StreamResponse(
            headers={
                "Content-Type": XLSX_MEDIA_TYPE,
                "Content-Disposition": f'attachment; filename="{filename}"',
                "Content-Length": str(size),
            }
        )
        await response.prepare(request)
        while data := await asyncio.to_thread(out.read, XLSX_SEND_BYTES):
            await response.write(data)
    await response.write_eof()
    return response


def _append(worksheet: WriteOnlyWorksheet, rows: Sequence[Sequence[Any]]) -> None:
    for row in rows:
        worksheet.append(row)
