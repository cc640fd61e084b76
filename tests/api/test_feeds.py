"""Per-user iCal feeds through HTTP: the secret URL's life cycle and what subscribers read.

Activities come from committed batches for a user without a pushed calendar (provider
``none``). The plan is on the first Monday of June next year (inside the default window of
548 days ahead; Copenhagen, UTC+2 in summer), 09:00-12:00 with one-hour meetings, so the
three meetings are at 07:00, 08:00 and 09:00 UTC.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import recurring_ical_events
from aiohttp import web
from aiohttp.test_utils import TestClient
from icalendar import Calendar, Component
from sqlalchemy import update

from syncsvc.config import Settings
from syncsvc.service import feeds as feeds_service
from syncsvc.store.db import Database
from syncsvc.store.models import Activity
from tests.api.conftest import TenantKey, Tenants
from tests.libical import libical_read

Client = TestClient[web.Request, web.Application]

USER_ID = "ck"
ZONE = "Europe/Copenhagen"
PUBLIC_BASE_URL = "http://127.0.0.1:8080"


def _first_monday_of_june(year: int) -> date:
    june = date(year, 6, 1)
    return june + timedelta(days=-june.weekday() % 7)


PLAN_DAY = _first_monday_of_june(datetime.now(UTC).year + 1)
MEETING_STARTS_UTC = [datetime.combine(PLAN_DAY, time(hour), UTC) for hour in (7, 8, 9)]
#: The window of the app the tests run (the defaults).
WINDOW = feeds_service.FeedWindow(Settings().feed_days_back, Settings().feed_days_ahead)
REMINDER_MINUTES = 15
TASK_DUE_DAYS = 3
NO_WEEKEND = {"mon": [["09:00", "12:00"]], **{d: [] for d in ("tue", "wed", "thu", "fri")}}


async def _put_user(client: Client, tenant: TenantKey, user_id: str = USER_ID) -> None:
    body = {"name": "Christine Kayser", "timezone": ZONE, "calendar": {"provider": "none"}}
    response = await client.put(f"/v1/users/{user_id}", json=body, headers=tenant.headers)
    assert response.status == 200, await response.text()


def _targets(count: int) -> list[dict[str, str]]:
    return [{"id": f"org-{n}", "name": f"Brewery {n}"} for n in range(1, count + 1)]


async def _commit(client: Client, tenant: TenantKey, kind: str = "meeting") -> list[dict[str, Any]]:
    """Commits a batch of three for ``USER_ID``; returns its activities in target order."""
    template: dict[str, Any] = {
        "kind": kind,
        "subject": "Visit $account-name$",
        "reminder_minutes": REMINDER_MINUTES,
    }
    if kind == "task":
        template["due_days"] = TASK_DUE_DAYS
    body = {
        "targets": _targets(3),
        "template": template,
        "schedule": {
            "start_date": PLAN_DAY.isoformat(),
            "week": {**NO_WEEKEND, "sat": [], "sun": []},
            "duration": "01:00",
            "skip_public_holidays": False,
        },
        "assignment": {"mode": "users", "users": [USER_ID]},
    }
    response = await client.post("/v1/batches", json=body, headers=tenant.headers)
    assert response.status == 201, await response.text()
    batch_id = (await response.json())["id"]
    listed = await client.get(f"/v1/batches/{batch_id}/activities", headers=tenant.headers)
    assert listed.status == 200
    items: list[dict[str, Any]] = (await listed.json())["items"]
    assert len(items) == 3
    return items


async def _new_feed(client: Client, tenant: TenantKey, user_id: str = USER_ID) -> str:
    """Creates or rotates the feed; returns its path on the test server."""
    response = await client.post(f"/v1/users/{user_id}/feed", headers=tenant.headers)
    assert response.status == 200, await response.text()
    url: str = (await response.json())["url"]
    assert url.startswith(f"{PUBLIC_BASE_URL}/feeds/") and url.endswith(".ics")
    return url.removeprefix(PUBLIC_BASE_URL)


async def _read(client: Client, path: str) -> tuple[Calendar, str]:
    response = await client.get(path)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/calendar; charset=utf-8"
    return Calendar.from_ical(await response.read()), response.headers["ETag"]


def _by_uid(calendar: Calendar) -> dict[str, Component]:
    return {str(c["UID"]): c for c in calendar.walk() if c.name in ("VEVENT", "VTODO")}


def _uid(activity: dict[str, Any]) -> str:
    """The UID the CalDAV provider gives the activity's event (lower-case id + domain)."""
    return f"{activity['id'].lower()}@syncsvc"


async def test_feed_shows_meetings_at_the_planned_instants(
    client: Client, tenants: Tenants
) -> None:
    await _put_user(client, tenants.a)
    activities = await _commit(client, tenants.a)
    path = await _new_feed(client, tenants.a)
    token = path.removeprefix("/feeds/").removesuffix(".ics")
    assert len(token) >= 43  # token_urlsafe(32): 256 bits

    calendar, _ = await _read(client, path)  # no Authorization header
    lines = (await (await client.get(path)).read()).split(b"\r\n")
    assert b"REFRESH-INTERVAL;VALUE=DURATION:PT1H" in lines
    assert b"X-PUBLISHED-TTL:PT1H" in lines

    assert str(calendar["VERSION"]) == "2.0"
    assert str(calendar["PRODID"]) and str(calendar["CALSCALE"]) == "GREGORIAN"
    assert str(calendar["X-WR-CALNAME"]) == "syncsvc: Christine Kayser"
    assert calendar["REFRESH-INTERVAL"].dt == timedelta(hours=1)
    assert calendar["REFRESH-INTERVAL"].params["VALUE"] == "DURATION"
    assert str(calendar["X-PUBLISHED-TTL"]) == "PT1H"
    assert [str(tz["TZID"]) for tz in calendar.walk("VTIMEZONE")] == [ZONE]

    day = recurring_ical_events.of(calendar).between(PLAN_DAY, PLAN_DAY + timedelta(days=1))
    assert sorted(e.start.astimezone(UTC) for e in day) == MEETING_STARTS_UTC
    events = _by_uid(calendar)
    assert set(events) == {_uid(a) for a in activities}
    for activity in activities:
        event = events[_uid(activity)]
        assert event.start == datetime.fromisoformat(activity["start"])
        assert event.start.tzinfo == ZoneInfo(ZONE)
        assert event.end - event.start == timedelta(hours=1)
        assert str(event["SUMMARY"]) == activity["subject"]
        assert str(event["STATUS"]) == "CONFIRMED"
        assert event["SEQUENCE"] == 0
        assert "DTSTAMP" in event and "LAST-MODIFIED" in event
        (alarm,) = event.walk("VALARM")
        assert alarm["TRIGGER"].dt == timedelta(minutes=-REMINDER_MINUTES)
    assert {str(e["SUMMARY"]) for e in events.values()} == {
        "Visit Brewery 1",
        "Visit Brewery 2",
        "Visit Brewery 3",
    }


async def test_tasks_are_todos_due_on_their_day(client: Client, tenants: Tenants) -> None:
    await _put_user(client, tenants.a)
    today = datetime.now(ZoneInfo(ZONE)).date()
    activities = await _commit(client, tenants.a, kind="task")
    calendar, _ = await _read(client, await _new_feed(client, tenants.a))

    assert calendar.walk("VEVENT") == []
    todos = _by_uid(calendar)
    assert set(todos) == {_uid(a) for a in activities}
    for todo in todos.values():
        assert todo.name == "VTODO"
        assert todo["DUE"].dt == today + timedelta(days=TASK_DUE_DAYS)
        assert str(todo["STATUS"]) == "NEEDS-ACTION"


async def test_edit_raises_sequence_and_cancel_marks_cancelled(
    client: Client, tenants: Tenants
) -> None:
    await _put_user(client, tenants.a)
    first, second, _ = await _commit(client, tenants.a)
    path = await _new_feed(client, tenants.a)
    before, etag_before = await _read(client, path)
    again, etag_again = await _read(client, path)
    assert etag_again == etag_before
    assert before.to_ical() == again.to_ical()

    moved = f"{PLAN_DAY.isoformat()}T14:00:00+02:00"
    response = await client.patch(
        f"/v1/activities/{first['id']}",
        json={"subject": "Tasting at Mikkeller", "start": moved},
        headers=tenants.a.headers,
    )
    assert response.status == 200, await response.text()
    response = await client.patch(
        f"/v1/activities/{second['id']}", json={"status": "cancelled"}, headers=tenants.a.headers
    )
    assert response.status == 200, await response.text()

    after, etag_after = await _read(client, path)
    assert etag_after != etag_before
    assert set(_by_uid(after)) == set(_by_uid(before))  # same UIDs, nothing new
    edited = _by_uid(after)[_uid(first)]
    assert str(edited["SUMMARY"]) == "Tasting at Mikkeller"
    assert edited.start.astimezone(UTC) == datetime.combine(PLAN_DAY, time(12), UTC)
    assert edited.end.astimezone(UTC) == datetime.combine(PLAN_DAY, time(13), UTC)
    assert edited["SEQUENCE"] > _by_uid(before)[_uid(first)]["SEQUENCE"]
    cancelled = _by_uid(after)[_uid(second)]
    assert str(cancelled["STATUS"]) == "CANCELLED"
    assert cancelled["SEQUENCE"] > _by_uid(before)[_uid(second)]["SEQUENCE"]


async def test_deleted_batch_stays_cancelled_for_30_days(
    client: Client, tenants: Tenants, db: Database
) -> None:
    await _put_user(client, tenants.a)
    activities = await _commit(client, tenants.a)
    path = await _new_feed(client, tenants.a)
    response = await client.delete(
        f"/v1/batches/{activities[0]['batch_id']}", headers=tenants.a.headers
    )
    assert response.status == 202, await response.text()

    calendar, _ = await _read(client, path)
    events = _by_uid(calendar)
    assert set(events) == {_uid(a) for a in activities}
    assert {str(e["STATUS"]) for e in events.values()} == {"CANCELLED"}
    assert {e["SEQUENCE"] for e in events.values()} == {1}

    token = path.removeprefix("/feeds/").removesuffix(".ics")
    # Kept through the 30th day after the day of deletion, gone from the 31st (UTC days).
    now = datetime.now(UTC)
    last_kept = now + timedelta(days=feeds_service.DELETED_KEPT_DAYS)
    dropped = now + timedelta(days=feeds_service.DELETED_KEPT_DAYS + 1)
    async with db.session() as session:
        etags = []
        for when, expected in ((now, 3), (last_kept, 3), (dropped, 0)):
            state = await feeds_service.feed_state(session, token, when, WINDOW)
            _, shown = await feeds_service.feed_activities(session, state)
            assert len(shown) == expected, when
            etags.append(state.etag)
    assert etags[2] not in etags[:2]


async def test_rotation_kills_the_old_url_and_revoke_kills_the_feed(
    client: Client, tenants: Tenants
) -> None:
    await _put_user(client, tenants.a)
    old = await _new_feed(client, tenants.a)
    assert (await client.get(old)).status == 200
    new = await _new_feed(client, tenants.a)
    assert new != old

    gone = await client.get(old)
    assert gone.status == 404
    assert (await gone.json())["error"]["code"] == "not_found"
    assert (await client.get(new)).status == 200

    for _ in range(2):
        response = await client.delete(f"/v1/users/{USER_ID}/feed", headers=tenants.a.headers)
        assert response.status == 204
    assert (await client.get(new)).status == 404
    assert (await client.get("/feeds/not-a-token.ics")).status == 404
    assert (await client.get(await _new_feed(client, tenants.a))).status == 200


async def test_etag_answers_304_until_something_changes(client: Client, tenants: Tenants) -> None:
    await _put_user(client, tenants.a)
    (activity, _, _) = await _commit(client, tenants.a)
    path = await _new_feed(client, tenants.a)
    first = await client.get(path)
    etag = first.headers["ETag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    assert first.headers["Cache-Control"].startswith("private, max-age=")

    for header in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        response = await client.get(path, headers={"If-None-Match": header})
        assert response.status == 304, header
        assert await response.read() == b""
        assert response.headers["ETag"] == etag
    assert (await client.get(path, headers={"If-None-Match": '"other"'})).status == 200

    response = await client.patch(
        f"/v1/activities/{activity['id']}",
        json={"reminder_minutes": 30},
        headers=tenants.a.headers,
    )
    assert response.status == 200
    changed = await client.get(path, headers={"If-None-Match": etag})
    assert changed.status == 200
    assert changed.headers["ETag"] != etag
    event = _by_uid(Calendar.from_ical(await changed.read()))[_uid(activity)]
    assert event.walk("VALARM")[0]["TRIGGER"].dt == timedelta(minutes=-30)


async def test_another_tenants_user_is_not_found(client: Client, tenants: Tenants) -> None:
    await _put_user(client, tenants.a)
    for method in ("POST", "DELETE"):
        response = await client.request(
            method, f"/v1/users/{USER_ID}/feed", headers=tenants.b.headers
        )
        assert response.status == 404, method
        assert (await response.json())["error"]["code"] == "not_found"
    assert (await client.post(f"/v1/users/{USER_ID}/feed")).status == 401


async def test_feed_route_is_in_the_spec(client: Client) -> None:
    spec = await (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/feeds/{token}.ics"]["get"]
    assert "text/calendar" in operation["responses"]["200"]["content"]
    assert operation["security"] == []
    assert "post" in spec["paths"]["/v1/users/{user_id}/feed"]
    assert "delete" in spec["paths"]["/v1/users/{user_id}/feed"]


async def test_etag_follows_every_change_even_a_late_commit(
    client: Client, tenants: Tenants, db: Database
) -> None:
    """Within ``WRITE_SETTLE_S`` of the newest change the ETag also counts versions, so a
    transaction that commits after a newer one (its stamp older than the newest) still
    changes it; later, the newest stamp alone decides."""
    await _put_user(client, tenants.a)
    first, _, _ = await _commit(client, tenants.a)
    token = (await _new_feed(client, tenants.a)).removeprefix("/feeds/").removesuffix(".ics")
    settled = timedelta(seconds=feeds_service.WRITE_SETTLE_S + 1)

    async def etag(now: datetime) -> str:
        async with db.session() as session:
            return (await feeds_service.feed_state(session, token, now, WINDOW)).etag

    recent, old = await etag(datetime.now(UTC)), await etag(datetime.now(UTC) + settled)
    assert await etag(datetime.now(UTC)) == recent
    assert await etag(datetime.now(UTC) + settled) == old

    # A late commit: the version rises but updated_at keeps a stamp older than the newest.
    async with db.session() as session, session.begin():
        await session.execute(
            update(Activity)
            .where(Activity.id == first["id"])
            .values(version=Activity.version + 1, updated_at=Activity.updated_at)
        )
    assert await etag(datetime.now(UTC)) != recent

    response = await client.patch(
        f"/v1/activities/{first['id']}", json={"subject": "Edited"}, headers=tenants.a.headers
    )
    assert response.status == 200
    assert await etag(datetime.now(UTC) + settled) != old


async def test_a_settled_feed_answers_304_until_a_patch_commits(
    client: Client, tenants: Tenants, db: Database
) -> None:
    """The settled path (newest change older than ``WRITE_SETTLE_S``; inline on SQLite)
    still reads the database on every request: the GET after a PATCH answered is a 200."""
    await _put_user(client, tenants.a)
    first, _, _ = await _commit(client, tenants.a)
    path = await _new_feed(client, tenants.a)
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    async with db.session() as session, session.begin():
        await session.execute(update(Activity).values(updated_at=an_hour_ago))
    etag = (await client.get(path)).headers["ETag"]
    for _ in range(3):
        assert (await client.get(path, headers={"If-None-Match": etag})).status == 304

    response = await client.patch(
        f"/v1/activities/{first['id']}", json={"subject": "Edited"}, headers=tenants.a.headers
    )
    assert response.status == 200
    changed = await client.get(path, headers={"If-None-Match": etag})
    assert changed.status == 200
    assert changed.headers["ETag"] != etag
    event = _by_uid(Calendar.from_ical(await changed.read()))[_uid(first)]
    assert str(event["SUMMARY"]) == "Edited"


async def test_libical_takes_the_feed_and_tasks_come_as_events_when_asked(
    client: Client, tenants: Tenants
) -> None:
    """Outlook and Google subscriptions ignore VTODO: ``?tasks=events`` gives all-day VEVENTs.
    Either way libical (Evolution's parser) finds nothing to reject, and cancelled items keep
    no alarm."""
    await _put_user(client, tenants.a)
    meetings = await _commit(client, tenants.a)
    tasks = await _commit(client, tenants.a, kind="task")
    for activity in (meetings[1], tasks[1]):
        response = await client.patch(
            f"/v1/activities/{activity['id']}",
            json={"status": "cancelled"},
            headers=tenants.a.headers,
        )
        assert response.status == 200, await response.text()
    path = await _new_feed(client, tenants.a)
    task_uids = {_uid(t) for t in tasks}
    cancelled_uids = {_uid(meetings[1]), _uid(tasks[1])}

    plain = await client.get(path)
    as_events = await client.get(path + "?tasks=events")
    assert plain.status == as_events.status == 200
    assert plain.headers["ETag"] != as_events.headers["ETag"]
    for body, task_kind in ((await plain.read(), "VTODO"), (await as_events.read(), "VEVENT")):
        read = libical_read(body)
        assert read.errors == []
        kinds = {i.uid: i.kind for i in read.items}
        assert {kinds[u] for u in task_uids} == {task_kind}
        assert {kinds[_uid(m)] for m in meetings} == {"VEVENT"}
        for item in read.items:
            assert item.cancelled == (item.uid in cancelled_uids)
            assert item.alarms == (0 if item.cancelled else 1)
            assert item.all_day == (item.uid in task_uids and task_kind == "VEVENT")

    again = await client.get(
        path + "?tasks=events", headers={"If-None-Match": as_events.headers["ETag"]}
    )
    assert again.status == 304
    wrong = await client.get(path + "?tasks=todo")
    assert wrong.status == 422


async def test_the_feed_shows_only_its_window_of_days(
    client: Client, tenants: Tenants, db: Database
) -> None:
    """From midnight UTC ``feed_days_back`` days ago to the end of the day
    ``feed_days_ahead`` days on: a meeting just inside each edge stays, one just outside
    either edge (or a task due past the end) is left out."""
    await _put_user(client, tenants.a)
    meetings = await _commit(client, tenants.a)
    more = await _commit(client, tenants.a)
    tasks = await _commit(client, tenants.a, kind="task")
    since, until = WINDOW.bounds(datetime.now(UTC))
    assert until - since == timedelta(days=WINDOW.days_back + WINDOW.days_ahead + 1)
    hour = timedelta(hours=1)
    moves = {
        meetings[0]["id"]: since,
        meetings[1]["id"]: until - hour,
        more[0]["id"]: since - hour,
        more[1]["id"]: until,
    }
    for activity_id, start in moves.items():
        response = await client.patch(
            f"/v1/activities/{activity_id}",
            json={"start": start.isoformat()},
            headers=tenants.a.headers,
        )
        assert response.status == 200, await response.text()
    # No API moves a task's due date: the store does, as a CRM's re-sync would.
    async with db.session() as session, session.begin():
        await session.execute(
            update(Activity).where(Activity.id == tasks[0]["id"]).values(due=until.date())
        )

    calendar, _ = await _read(client, await _new_feed(client, tenants.a))
    left_out = {_uid(more[0]), _uid(more[1]), _uid(tasks[0])}
    everything = {_uid(a) for a in (*meetings, *more, *tasks)}
    assert set(_by_uid(calendar)) == everything - left_out
    assert _by_uid(calendar)[_uid(meetings[0])].start.astimezone(UTC) == since


async def test_the_etag_and_the_body_move_on_with_the_window(
    client: Client, tenants: Tenants, db: Database
) -> None:
    """With no change to any activity, tomorrow's feed is another one: the meeting on the
    window's first day drops out, so the ETag must differ and that body must leave it out.
    So is today's feed under another ``SYNCSVC_FEED_DAYS_BACK`` (after a restart)."""
    await _put_user(client, tenants.a)
    oldest, _, _ = await _commit(client, tenants.a)
    now = datetime.now(UTC)
    since, _ = WINDOW.bounds(now)
    response = await client.patch(
        f"/v1/activities/{oldest['id']}",
        json={"start": (since + timedelta(hours=1)).isoformat()},
        headers=tenants.a.headers,
    )
    assert response.status == 200, await response.text()
    token = (await _new_feed(client, tenants.a)).removeprefix("/feeds/").removesuffix(".ics")

    async def state(
        at: datetime, window: feeds_service.FeedWindow = WINDOW
    ) -> tuple[str, set[str]]:
        async with db.session() as session:
            state = await feeds_service.feed_state(session, token, at, window)
            _, shown = await feeds_service.feed_activities(session, state)
        return state.etag, {a.id for a in shown}

    etag_today, shown_today = await state(now)
    etag_tomorrow, shown_tomorrow = await state(now + timedelta(days=1))
    assert etag_tomorrow != etag_today
    assert oldest["id"] in shown_today and oldest["id"] not in shown_tomorrow
    assert len(shown_tomorrow) == 2
    shorter = feeds_service.FeedWindow(WINDOW.days_back - 1, WINDOW.days_ahead)
    etag_shorter, shown_shorter = await state(now, shorter)
    assert etag_shorter != etag_today
    assert shown_shorter == shown_tomorrow
