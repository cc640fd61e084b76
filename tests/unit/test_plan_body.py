"""The plan body as the API converts it: planner values and the stored body agree with what
pydantic itself dumps, field by field (a field added to the models must reach both)."""

from __future__ import annotations

from dataclasses import replace

from syncsvc.api.plan_schemas import PlanBody
from syncsvc.service.plans import spec_from_json, target_json

BODY = {
    "targetgroup_name": "Bryggerier",
    "targets": [
        {
            "id": "t1",
            "name": "Bryggeri 1",
            "email": "a@example.org",
            "postcode": "8000",
            "owner_id": "u1",
            "organisation_id": "o1",
            "contacts": [
                {"id": "c1", "first_name": "Ulla", "block_mass_email": True, "status": "inactive"},
                {"id": "c2", "last_name": "Berg", "mobile": "+45 1234"},
            ],
        },
        {"id": "t2", "name": "Bryggeri 2", "second_owner_id": "u2"},
    ],
    "template": {"kind": "meeting", "subject": "Visit $account-name$"},
    "schedule": {"start_date": "2027-06-07", "duration": "00:30"},
    "assignment": {"mode": "users", "users": ["u1"]},
}


def test_the_spec_and_stored_body_match_the_models_own_dump() -> None:
    body = PlanBody.model_validate(BODY)
    spec = body.to_spec()
    dumped = body.model_dump(mode="json")
    stored = {**spec.body, "targets": [target_json(t) for t in spec.targets]}
    assert stored == dumped  # as a batch stores it
    # A stored body converts back to the very same planner values (a template edit does so).
    assert replace(spec_from_json(dumped), body={}) == replace(spec, body={})


def test_activity_ids_are_distinct_version_4_uuids() -> None:
    from uuid import UUID

    from syncsvc.service.batches import _uuid4_hexes

    ids = list(_uuid4_hexes(2000))
    assert len(set(ids)) == 2000
    assert all(UUID(i).version == 4 and UUID(i).variant == "specified in RFC 4122" for i in ids)
    assert all(UUID(i).hex == i for i in ids)
