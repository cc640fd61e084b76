"""``/openapi.json`` is valid OpenAPI 3.1, lists every route, and says what the code does."""

from __future__ import annotations

import re
from typing import Any

import jsonschema_rs
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient

from syncsvc.api._framework import access_for
from tests.api.conftest import Tenants
from tests.api.test_users import user_body

Client = TestClient[web.Request, web.Application]
ERROR_REF = {"$ref": "#/components/schemas/ErrorEnvelope"}


async def _doc(client: Client) -> dict[str, Any]:
    got = await client.get("/openapi.json")
    assert got.status == 200 and got.content_type == "application/json"
    doc: dict[str, Any] = await got.json()
    return doc


async def test_the_document_is_valid_openapi_3_1(client: Client) -> None:
    doc = await _doc(client)
    assert doc["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(doc).validate()  # the OpenAPI 3.1 meta-schema
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name  # JSON Schema 2020-12


async def test_every_route_is_documented(client: Client, app: web.Application) -> None:
    doc = await _doc(client)
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    assert {
        ("put", "/v1/users/{user_id}"),
        ("get", "/v1/users/{user_id}"),
        ("get", "/v1/users/{user_id}/days-off"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    } <= documented


async def test_errors_security_and_parameters_are_documented(client: Client) -> None:
    doc = await _doc(client)
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status in ("400", "401", "404", "409", "413", "422"):
                schema = op["responses"][status]["content"]["application/json"]["schema"]
                assert schema == ERROR_REF, (method, path, status)
            public = access_for(path) == "public"
            assert op["security"] == ([] if public else [{"bearer": []}]), path
            path_params = {p["name"] for p in op.get("parameters", ()) if p["in"] == "path"}
            assert path_params == set(re.findall(r"\{([^}]+)\}", path))
            if method == "post" and access_for(path) == "tenant":
                keyed = any(p["name"] == "Idempotency-Key" for p in op.get("parameters", ()))
                assert keyed == (path != "/v1/plans"), path  # a preview writes nothing


async def test_user_schemas_match_the_contract(client: Client) -> None:
    doc = await _doc(client)
    op = doc["paths"]["/v1/users/{user_id}"]["put"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/UserIn"
    }
    user_in = doc["components"]["schemas"]["UserIn"]
    assert set(user_in["required"]) == {"timezone", "calendar"}
    assert set(user_in["properties"]) == {
        "name",
        "email",
        "mobile",
        "timezone",
        "country",
        "subdivision",
        "days_off",
        "calendar",
    }
    providers = user_in["properties"]["calendar"]["discriminator"]["mapping"]
    assert set(providers) == {"graph", "google", "caldav", "none"}
    user_out = doc["components"]["schemas"]["UserOut"]
    assert "password" not in str(user_out) and 'oauth"' not in str(user_out)
    params = doc["paths"]["/v1/users/{user_id}/days-off"]["get"]["parameters"]
    assert {p["name"] for p in params if p["in"] == "query"} == {"from", "to"}
    listing = doc["paths"]["/v1/users"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"limit", "cursor", "format"}
    assert set(listing["responses"]["200"]["content"]) == {"application/json", "text/csv"}


async def test_answers_validate_against_the_documented_schemas(
    client: Client, tenants: Tenants
) -> None:
    """A real answer checked with the spec's own schema (``$ref``s resolve in the copied
    ``components``): the code and the document agree."""
    doc = await _doc(client)
    put = await client.put("/v1/users/u1", json=user_body(), headers=tenants.a.headers)
    bad = await client.put("/v1/users/u1", json={}, headers=tenants.a.headers)
    for name, answer in (("UserOut", await put.json()), ("ErrorEnvelope", await bad.json())):
        schema = {**doc["components"]["schemas"][name], "components": doc["components"]}
        jsonschema_rs.validate(schema, answer)
