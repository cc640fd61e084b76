"""Large plan bodies are parsed in a child process and validated in chunks (``api/bodies.py``):
the answers and the errors are exactly those of a small body, located in the whole body."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import BaseModel, Field

from syncsvc.api.bodies import CHUNK_ITEMS, HEAVY_BODY_BYTES, dump_json
from syncsvc.api.plan_schemas import PlanBody
from tests.api.conftest import Tenants
from tests.api.test_plans import plan_body, put_users

Client = TestClient[web.Request, web.Application]
JSON = {"Content-Type": "application/json"}
TARGETS = 2_000


def large(body: dict[str, Any]) -> bytes:
    raw = json.dumps(body).encode()
    assert len(raw) > HEAVY_BODY_BYTES and len(body["targets"]) > 4 * CHUNK_ITEMS
    return raw


async def test_a_large_plan_is_planned_whole_and_in_order(client: Client, tenants: Tenants) -> None:
    await put_users(client, tenants.a)
    body = plan_body(targets=TARGETS)
    body["exclude"] = [f"org-{i}" for i in range(0, TARGETS, 7)]
    answer = await client.post("/v1/plans", data=large(body), headers={**JSON, **tenants.a.headers})
    assert answer.status == 200, (await answer.text())[:300]
    preview = await answer.json()
    kept = [f"org-{i}" for i in range(TARGETS) if i % 7]
    assert sorted(a["target_id"] for a in preview["activities"]) == sorted(kept)
    assert preview["total"] == len(kept)
    # Each target's own fields came through its chunk.
    subjects = {a["target_id"]: a["subject"] for a in preview["activities"]}
    assert subjects["org-1999"] == "Visit Org 1999" and subjects["org-251"] == "Visit Org 251"


@pytest.mark.parametrize(
    ("index", "change", "loc"),
    [
        (0, {"name": 5}, ["body", "targets", 0, "name"]),
        (1, {"name": 5}, ["body", "targets", 1, "name"]),
        (1_777, {"name": 5}, ["body", "targets", 1_777, "name"]),
        (1_999, {"contacts": [{"id": 5}]}, ["body", "targets", 1_999, "contacts", 0, "id"]),
        (1_500, {"name": "Org\x00"}, ["body", "targets", 1_500, "name"]),
        # What orjson refuses and json takes: the same answer as ever.
        (1_600, {"name": "Org \ud800"}, ["body", "targets", 1_600, "name"]),
        (1_700, {"postcode": 10**30}, ["body", "targets", 1_700, "postcode"]),
    ],
)
async def test_an_error_deep_in_a_large_body_names_its_place(
    client: Client, tenants: Tenants, index: int, change: dict[str, Any], loc: list[Any]
) -> None:
    await put_users(client, tenants.a)
    body = plan_body(targets=TARGETS)
    body["targets"][index].update(change)
    answer = await client.post("/v1/plans", data=large(body), headers={**JSON, **tenants.a.headers})
    assert answer.status == 422, (await answer.text())[:300]
    details = (await answer.json())["error"]["details"]
    assert loc in [d["loc"] for d in details], details


async def test_a_large_body_nested_too_deeply_is_400_whatever_the_depth(
    client: Client, tenants: Tenants
) -> None:
    for depth in (40, 5_000):  # orjson stops at 1,024 levels, json goes on
        body = plan_body(targets=TARGETS)
        deep: Any = "x"
        for _ in range(depth):
            deep = [deep]
        body["targets"][1_234]["extra"] = deep
        raw = json.dumps(body).encode() if depth < 900 else _dumps_deep(body)
        answer = await client.post("/v1/plans", data=raw, headers={**JSON, **tenants.a.headers})
        assert answer.status == 400, (await answer.text())[:300]
        assert "nested" in (await answer.json())["error"]["message"]


def _dumps_deep(body: dict[str, Any]) -> bytes:
    """json.dumps recurses too: the deep value is spliced in as text."""
    target = body["targets"][1_234]
    depth = 0
    value = target.pop("extra")
    while isinstance(value, list):
        depth, value = depth + 1, value[0]
    target["extra"] = "DEEP"
    return json.dumps(body).encode().replace(b'"DEEP"', b"[" * depth + b'"x"' + b"]" * depth)


async def test_a_large_body_that_is_not_json_is_400(client: Client, tenants: Tenants) -> None:
    raw = large(plan_body(targets=TARGETS))[:-10]
    answer = await client.post("/v1/plans", data=raw, headers={**JSON, **tenants.a.headers})
    assert answer.status == 400, await answer.text()
    assert (await answer.json())["error"]["message"] == "the body is not valid JSON"


class Item(BaseModel):
    from_: str = Field(alias="from")
    n: int


class Envelope(BaseModel):
    name: str
    items: list[Item]
    tail: list[int]


def test_a_large_answer_is_serialised_exactly_as_in_one_piece() -> None:
    model = Envelope(
        name='a "quoted" name',
        items=[Item.model_validate({"from": f"x{i}", "n": i}) for i in range(3 * CHUNK_ITEMS + 1)],
        tail=list(range(CHUNK_ITEMS * 2)),
    )
    assert dump_json(model) == model.model_dump_json(by_alias=True).encode()
    empty = Envelope(name="", items=[], tail=[])
    assert dump_json(empty) == empty.model_dump_json(by_alias=True).encode()


def test_the_plan_model_has_the_lists_the_child_cuts() -> None:
    # The child cuts top-level list fields: the targets list must be one, by its JSON key.
    assert PlanBody.model_fields["targets"].annotation.__origin__ is list  # type: ignore[union-attr]
