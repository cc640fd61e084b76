"""Declarative endpoints: one set of pydantic models validates the input AND writes the spec.

An API module owns a ``Routes`` table and declares each endpoint on it; ``syncsvc/app.py``
mounts every table and serves ``GET /openapi.json`` generated from the very same models, so
the documentation cannot drift from what the code accepts and answers.

Usage (``syncsvc/api/widgets.py``; then add ``"widgets"`` to ``API_MODULES`` in ``app.py``)::

    from pydantic import BaseModel, Field

    from syncsvc.api._framework import Ctx, Routes
    from syncsvc.api.pagination import Page, PageQuery
    from syncsvc.service import widgets as service

    routes = Routes(tag="widgets")

    class WidgetPath(BaseModel):
        widget_id: str = Field(min_length=1, max_length=200)

    class WidgetIn(BaseModel):
        name: str = Field(max_length=200)

    class WidgetOut(BaseModel):
        id: str
        name: str

    @routes.endpoint("PUT", "/v1/widgets/{widget_id}", path=WidgetPath, body=WidgetIn,
                     response=WidgetOut, summary="Create or replace a widget")
    async def put_widget(ctx: Ctx, path: WidgetPath, body: WidgetIn) -> WidgetOut:
        async with ctx.session() as session, session.begin():
            row = await service.put(session, ctx.tenant_id, path.widget_id, body.name)
        return WidgetOut(id=row.id, name=row.name)

    @routes.endpoint("GET", "/v1/widgets", query=PageQuery, response=Page[WidgetOut],
                     summary="List widgets")
    async def list_widgets(ctx: Ctx, query: PageQuery) -> Page[WidgetOut]: ...

    @routes.endpoint("DELETE", "/v1/widgets/{widget_id}", path=WidgetPath, status=202,
                     summary="Delete a widget")
    async def delete_widget(ctx: Ctx, path: WidgetPath) -> None: ...  # None: empty body

Rules:

- The handler gets ``ctx`` plus keyword arguments ``path``, ``query``, ``body`` (and
  ``headers``, a model whose aliases are header names) for exactly the
  models declared. It returns an instance of ``response`` (serialised as JSON with ``status``),
  ``None`` (empty answer with ``status``, e.g. 202/204), or any ``web.StreamResponse`` as an
  escape hatch (CSV, iCal, HTML; declare its media type with ``media_type=`` so the spec lists it).
- Bodies must be ``application/json`` and parse (else 400); they are validated in pydantic's
  strict JSON mode (``"3"`` is not an int; ISO strings are dates) — a failure is a 422 whose
  details name the field (``loc`` starts with ``body``/``query``/``path``). Strings with NUL or
  lone surrogates are refused with 422 before any model sees them (databases cannot store them).
- Query parameters the ``query`` model does not name are refused with 422 (typos show).
- Handlers raise ``syncsvc.errors`` exceptions; the error middleware turns them into answers.
  Handlers never build error responses themselves.
- Who may call a path is decided by ``access_for(path)`` (public / tenant / operator), used both
  by the auth middleware and by the spec's ``security``.
"""

from __future__ import annotations

import asyncio
import contextlib
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from pydantic.json_schema import models_json_schema
from sqlalchemy.ext.asyncio import AsyncSession

from syncsvc.api.bodies import (
    HEAVY_BODY_BYTES,
    BodyPool,
    check_strings,
    dump_json,
    parse_body,
    validation_error,
)
from syncsvc.config import Settings
from syncsvc.errors import BadRequest, ErrorDetail, Unauthorized, ValidationError
from syncsvc.metrics import Metrics
from syncsvc.quiet_gc import heavy_work
from syncsvc.service.idempotency import READ_ONLY_POSTS
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database
from syncsvc.store.models import Tenant

# --- Typed application and request state (web.AppKey / web.RequestKey). ---

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", Database)
SECRET_BOX = web.AppKey("secret_box", SecretBox)
METRICS = web.AppKey("metrics", Metrics)
OPENAPI = web.AppKey("openapi", dict[str, Any])
BODY_POOL = web.AppKey("body_pool", BodyPool)
#: Set by the auth middleware for tenant requests.
TENANT = web.RequestKey("tenant", Tenant)

Access = Literal["public", "tenant", "operator"]
Method = Literal["GET", "PUT", "POST", "PATCH", "DELETE"]
Part = Literal["path", "query", "body", "header"]

#: Paths that need no key (the contract's list); the dashboard checks the operator key itself.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/metrics"})
PUBLIC_PREFIXES = ("/feeds/", "/dashboard", "/webhooks/", "/oauth/")
OPERATOR_PREFIX = "/v1/ops/"

JSON_MEDIA_TYPE = "application/json"
#: Statuses every operation may answer with the error envelope.
ERROR_STATUSES = (400, 401, 404, 409, 413, 422, 429, 503)


def access_for(path: str) -> Access:
    """Who may call ``path``: the one rule the auth middleware and the spec share."""
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return "public"
    if path.startswith(OPERATOR_PREFIX) or path == OPERATOR_PREFIX.rstrip("/"):
        return "operator"
    return "tenant"


@dataclass(frozen=True, slots=True)
class Ctx:
    """What a handler may use: the tenant that called, the database, the secret box."""

    request: web.Request
    settings: Settings
    db: Database
    box: SecretBox
    tenant: Tenant | None

    @property
    def tenant_id(self) -> str:
        if self.tenant is None:
            raise Unauthorized("an API key is required")
        return self.tenant.id

    def session(self) -> AsyncSession:
        """A new session; use ``async with ctx.session() as s, s.begin():`` for one transaction."""
        return self.db.session()


# --- The error envelope (also part of the spec). ---


class ErrorDetailModel(BaseModel):
    loc: list[str | int]
    msg: str


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[ErrorDetailModel]


class ErrorEnvelope(BaseModel):
    error: ErrorBody


Handler = Callable[..., Awaitable[BaseModel | web.StreamResponse | None]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: Method
    path: str
    handler: Handler
    summary: str
    tag: str
    status: int
    path_model: type[BaseModel] | None
    query_model: type[BaseModel] | None
    body_model: type[BaseModel] | None
    response_model: type[BaseModel] | None
    #: Another media type the handler may answer with (as a ``web.StreamResponse``).
    media_type: str | None
    description: str
    #: Extra documented error statuses (e.g. 403 for operator paths).
    error_statuses: tuple[int, ...]
    #: Other success answers as (status, media type or None for an empty body), e.g. a
    #: webhook's 200 text/plain handshake next to its 202.
    other_successes: tuple[tuple[int, str | None], ...] = ()
    #: Request headers as a model whose field aliases are the header names (webhooks, whose
    #: senders put their proof in headers); validated like the other parts.
    header_model: type[BaseModel] | None = None
    #: Bodies and answers that may be large (a plan of 100,000 targets): parsed in a child
    #: process and serialised in a thread, in chunks (``api/bodies.py``), so the event loop
    #: keeps serving other tenants meanwhile.
    heavy: bool = False

    @property
    def access(self) -> Access:
        return access_for(self.path)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler: validate the parts, call the handler, serialise its answer."""
        app = request.app
        ctx = Ctx(
            request=request,
            settings=app[SETTINGS],
            db=app[DB],
            box=app[SECRET_BOX],
            tenant=request.get(TENANT),
        )
        kwargs: dict[str, BaseModel] = {}
        _refuse_unknown_query(request, self.query_model)
        if self.path_model is not None:
            kwargs["path"] = _validate(self.path_model, dict(request.match_info), "path")
        if self.query_model is not None:
            kwargs["query"] = _validate(
                self.query_model, _query(request, self.query_model), "query"
            )
        if self.header_model is not None:
            kwargs["headers"] = _validate(
                self.header_model, _headers(request, self.header_model), "header"
            )
        with heavy_work() if self.heavy else contextlib.nullcontext():
            return await self._answer(request, ctx, kwargs)

    async def _answer(
        self, request: web.Request, ctx: Ctx, kwargs: dict[str, BaseModel]
    ) -> web.StreamResponse:
        if self.body_model is not None:
            kwargs["body"] = await _read_body(request, self.body_model, self.heavy)
        result = await self.handler(ctx, **kwargs)
        if isinstance(result, web.StreamResponse):
            return result
        if result is None:
            return web.Response(status=self.status)
        if self.response_model is None or not isinstance(result, self.response_model):
            raise TypeError(f"{self.handler.__qualname__} returned {type(result).__name__}")
        if self.heavy:
            return await asyncio.to_thread(json_response, result, self.status)
        return json_response(result, status=self.status)


class Routes:
    """One API module's endpoints, mounted by ``build_app`` and listed in the spec."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.endpoints: list[Endpoint] = []

    def endpoint(
        self,
        method: Method,
        url: str,
        /,
        *,
        summary: str,
        path: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        body: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        status: int = 200,
        media_type: str | None = None,
        description: str = "",
        error_statuses: Sequence[int] = (),
        other_successes: Sequence[tuple[int, str | None]] = (),
        headers: type[BaseModel] | None = None,
        heavy: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Registers the decorated handler; see the module docstring for the rules."""

        def register(handler: Handler) -> Handler:
            self.endpoints.append(
                Endpoint(
                    method=method,
                    path=url,
                    handler=handler,
                    summary=summary,
                    tag=self.tag,
                    status=status,
                    path_model=path,
                    query_model=query,
                    body_model=body,
                    response_model=response,
                    media_type=media_type,
                    description=description or (handler.__doc__ or "").strip(),
                    error_statuses=tuple(error_statuses),
                    other_successes=tuple(other_successes),
                    header_model=headers,
                    heavy=heavy,
                )
            )
            return handler

        return register


# --- Input. ---


def json_response(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        body=dump_json(model),
        status=status,
        content_type=JSON_MEDIA_TYPE,
    )


def _headers(request: web.Request, model: type[BaseModel]) -> dict[str, str]:
    """The model's headers (by alias, case-insensitively) that the request carries."""
    names = [f.alias or name for name, f in model.model_fields.items()]
    return {name: request.headers[name] for name in names if name in request.headers}


def _validate(model: type[BaseModel], data: Mapping[str, Any], part: Part) -> BaseModel:
    check_strings(data, (part,))
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        raise validation_error(exc, (part,)) from exc


def _refuse_unknown_query(request: web.Request, model: type[BaseModel] | None) -> None:
    """A misspelt parameter (``?limt=10``) is an error, not silently the default."""
    if model is not None and model.model_config.get("extra") == "ignore":
        return  # a provider's redirect, which may add parameters of its own
    known = set() if model is None else {f.alias or n for n, f in model.model_fields.items()}
    unknown = sorted(set(request.query) - known)
    if unknown:
        raise ValidationError(
            "unknown query parameters",
            [ErrorDetail(("query", name), "unknown parameter") for name in unknown],
        )


def _query(request: web.Request, model: type[BaseModel]) -> dict[str, Any]:
    """Query parameters, as lists only where the model asks for a list."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = field.alias or name
        values = request.query.getall(key, [])
        if not values:
            continue
        listed = typing.get_origin(field.annotation) in (list, tuple, set, frozenset)
        out[key] = values if listed else values[-1]
    return out


async def _read_body(request: web.Request, model: type[BaseModel], heavy: bool) -> BaseModel:
    if request.content_type != JSON_MEDIA_TYPE:
        raise BadRequest(
            "the body must be JSON",
            [ErrorDetail(("header", "Content-Type"), f"must be {JSON_MEDIA_TYPE}")],
        )
    raw = await request.read()
    if heavy and len(raw) > HEAVY_BODY_BYTES:
        return await request.app[BODY_POOL].parse(raw, model)
    return parse_body(raw, model)


# --- The OpenAPI document. ---

_REF_TEMPLATE = "#/components/schemas/{model}"


def openapi_document(endpoints: Iterable[Endpoint], *, title: str, version: str) -> dict[str, Any]:
    """OpenAPI 3.1 from the endpoints' own models (JSON Schema 2020-12, as pydantic writes it)."""
    endpoints = list(endpoints)
    wanted: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (ErrorEnvelope, "serialization")
    ]
    for ep in endpoints:
        for model in (ep.path_model, ep.query_model, ep.body_model, ep.header_model):
            if model is not None:
                wanted.append((model, "validation"))
        if ep.response_model is not None:
            wanted.append((ep.response_model, "serialization"))
    refs, top = models_json_schema(list(dict.fromkeys(wanted)), ref_template=_REF_TEMPLATE)
    schemas: dict[str, Any] = top.get("$defs", {})

    def ref(model: type[BaseModel], mode: Literal["validation", "serialization"]) -> Any:
        return refs[(model, mode)]

    def resolved(model: type[BaseModel]) -> dict[str, Any]:
        name = ref(model, "validation")["$ref"].rsplit("/", 1)[-1]
        return typing.cast(dict[str, Any], schemas[name])

    error_content = {JSON_MEDIA_TYPE: {"schema": ref(ErrorEnvelope, "serialization")}}
    paths: dict[str, dict[str, Any]] = {}
    names = [ep.handler.__name__ for ep in endpoints]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"handler names are operationIds and must be unique: {twice}")
    for ep in endpoints:
        op: dict[str, Any] = {
            "operationId": ep.handler.__name__,
            "summary": ep.summary,
            "tags": [ep.tag],
        }
        if ep.description:
            op["description"] = ep.description
        params: list[dict[str, Any]] = []
        for location, model in (
            ("path", ep.path_model),
            ("query", ep.query_model),
            ("header", ep.header_model),
        ):
            if model is not None:
                params.extend(_parameters(location, resolved(model)))
        if ep.method == "POST" and ep.access == "tenant" and ep.path not in READ_ONLY_POSTS:
            params.append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "Replays the first answer for the same body; 409 otherwise.",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                }
            )
        if params:
            op["parameters"] = params
        if ep.body_model is not None:
            op["requestBody"] = {
                "required": True,
                "content": {JSON_MEDIA_TYPE: {"schema": ref(ep.body_model, "validation")}},
            }
        ok: dict[str, Any] = {"description": ep.summary}
        content: dict[str, Any] = {}
        if ep.response_model is not None:
            content[JSON_MEDIA_TYPE] = {"schema": ref(ep.response_model, "serialization")}
        if ep.media_type is not None:
            content[ep.media_type] = {"schema": {"type": "string"}}
        if content:
            ok["content"] = content
        responses: dict[str, Any] = {str(ep.status): ok}
        for status, media_type in ep.other_successes:
            if status == ep.status and media_type is not None:  # another form of the answer
                ok.setdefault("content", {})[media_type] = {"schema": {"type": "string"}}
                continue
            other: dict[str, Any] = {"description": _STATUS_TEXT.get(status, ep.summary)}
            if media_type is not None:
                other["content"] = {media_type: {"schema": {"type": "string"}}}
            responses[str(status)] = other
        statuses = set(ERROR_STATUSES) | set(ep.error_statuses)
        if ep.access == "operator":
            statuses.add(403)
        for status in sorted(statuses):
            responses[str(status)] = {
                "description": _STATUS_TEXT.get(status, "error"),
                "content": error_content,
            }
        op["responses"] = responses
        op["security"] = [] if ep.access == "public" else [{"bearer": []}]
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tenant's API key (or the operator key for /v1/ops).",
                }
            },
        },
    }


def _parameters(location: str, schema: Mapping[str, Any]) -> list[dict[str, Any]]:
    required = set(schema.get("required", ()))
    out: list[dict[str, Any]] = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        param: dict[str, Any] = {
            "name": name,
            "in": location,
            "required": location == "path" or name in required,
        }
        description = prop.pop("description", None)
        prop.pop("title", None)
        if description:
            param["description"] = description
        param["schema"] = prop
        out.append(param)
    return out


_STATUS_TEXT = {
    400: "The request cannot be parsed (not JSON, wrong content type).",
    401: "No API key, or an unknown one.",
    403: "The key may not use this path (operator only).",
    404: "No such resource for this tenant.",
    409: "Conflict with stored state, or an Idempotency-Key reused with another body.",
    413: "The body is larger than the limit.",
    422: "Valid JSON whose meaning is invalid; details name each field.",
    429: "Too many requests: the tenant's quota (see the RateLimit and RateLimit-Policy "
    "headers) or too many failed sign-ins; retry after the Retry-After seconds.",
    503: "The database is unavailable for a moment: retry after the Retry-After seconds.",
}
